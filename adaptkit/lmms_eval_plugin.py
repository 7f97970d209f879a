"""The lmms-eval plug-in: ``lmms-eval --model adaptkit --model_args path=DIR --tasks ...`` evaluates a run
directory or an ``adaptkit`` export (VQA or captioning) with adaptkit's own generation.

adaptkit registers it through lmms-eval's entry-point group ``lmms_eval.models`` (``pyproject.toml``:
``adaptkit = "adaptkit.lmms_eval_plugin:manifest"``), so it is found wherever both are installed; adaptkit
does not depend on lmms-eval. ``model_args``: ``path`` (required), ``batch_size`` (questions per forward pass;
default the run's ``eval_batch_size``), ``device`` (default cuda when there is one), ``prompt`` (caption runs:
``run``, the default, captions after the recipe's caption prompt, as the run was trained; ``task`` after
each request's context instead).

A VQA run: each request's context (the task's prompt text: a question, with whatever instruction the task
adds) becomes the question in the run's prompt format (``data.prompt_template`` or the LM's chat template, as
in training), and its first image the image; ``generate_until`` returns the run's greedy answers (at most
``max_new_tokens`` of the request, else the run's, cut at the first ``until`` string); ``loglikelihood``
scores a continuation as the answer, with whether it is the greedy answer. A caption run (lmms-eval's
captioning tasks: COCO, Flickr30k, NoCaps) answers ``generate_until`` with its greedy captions, cut the same
way; it has no ``loglikelihood``. :class:`AdaptkitRequests` holds that logic and needs no
lmms-eval (tests drive it with requests shaped as lmms-eval's); ``AdaptkitLMMS``, made on first access, is
it on lmms-eval's ``lmms`` base class.
"""

from __future__ import annotations

from collections.abc import Sequence


def manifest():
    """lmms-eval's registration payload (entry point ``lmms_eval.models``: ``adaptkit``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="adaptkit", simple_class_path="adaptkit.lmms_eval_plugin.AdaptkitLMMS")


class AdaptkitRequests:
    """lmms-eval's request methods on a run or export (see the module docstring)."""

    def __init__(
        self,
        path: str,
        batch_size: int | str | None = None,
        device: str | None = None,
        prompt: str = "run",
        **_,
    ) -> None:
        from adaptkit.inference import load_for_inference

        self.predictor = load_for_inference(path, device)
        if self.predictor.recipe.task not in ("vqa", "caption"):
            raise ValueError(
                f"{path}: lmms-eval's generation tasks need a VQA or caption run, not "
                f"task={self.predictor.recipe.task}"
            )
        if prompt not in ("run", "task"):
            raise ValueError(f"model_args prompt={prompt!r}: use run (the recipe's caption prompt) or task")
        self.prompt = prompt
        self.batch_size = int(batch_size) if batch_size else self.predictor.recipe.eval_batch_size
        if not hasattr(self, "task_dict"):
            self.task_dict: dict = {}

    def _inputs(self, requests) -> tuple[list, list[str], list]:
        """Each request's first image, its context and its second argument (generation settings or target)."""
        images, contexts, seconds = [], [], []
        for context, second, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            visuals = [
                v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if v is not None
            ]
            if not visuals:
                raise ValueError(
                    f"lmms-eval task {task} ({split}, doc {doc_id}) gives no image; adaptkit answers about "
                    "one image"
                )
            images.append(visuals[0])
            contexts.append(context)
            seconds.append(second)
        return images, contexts, seconds

    def generate_until(self, requests) -> list[str]:
        from tqdm.auto import tqdm

        images, contexts, settings = self._inputs(requests)
        recipe = self.predictor.recipe
        out: list[str] = []
        for start in tqdm(range(0, len(requests), self.batch_size), desc="adaptkit answering", unit="batch"):
            chunk = slice(start, start + self.batch_size)
            kwargs = settings[start] or {}
            new = int(kwargs.get("max_new_tokens") or recipe.max_new_tokens)
            answers = self._answers(images[chunk], contexts[chunk], new)
            for answer, setting in zip(answers, settings[chunk]):
                until = (setting or {}).get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    answer = answer.split(stop)[0] if stop else answer
                out.append(answer.strip())
        return out

    def _answers(self, images: Sequence, questions: Sequence[str], max_new_tokens: int) -> list[str]:
        import dataclasses

        predictor = self.predictor
        recipe = predictor.recipe
        predictor.recipe = dataclasses.replace(recipe, max_new_tokens=max_new_tokens)
        try:
            if recipe.task == "vqa":
                found = predictor.answer_batch(images, questions, top_k=0, batch_size=self.batch_size)
                return [a.text for a in found]
            prompts = questions if self.prompt == "task" else [None] * len(questions)  # None: the recipe's
            out: dict[int, str] = {}
            for prompt in dict.fromkeys(prompts):  # each distinct prompt, its images batched together
                at = [i for i, p in enumerate(prompts) if p == prompt]
                found = predictor.caption_batch([images[i] for i in at], prompt)
                out.update(zip(at, (c.text for c in found)))
            return [out[i] for i in range(len(questions))]
        finally:
            predictor.recipe = recipe

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        if self.predictor.recipe.task != "vqa":
            raise NotImplementedError("a caption run answers lmms-eval's generate_until tasks only")
        images, contexts, targets = self._inputs(requests)
        out = []
        for request, image, context, target in zip(requests, images, contexts, targets):
            _, _, _, doc_id, task, split = request.args
            if not isinstance(target, str):
                target = target(self.task_dict[task][split][doc_id])
            feats = self.predictor.encode([image])
            logp = self.predictor.candidate_logprobs(
                feats, self.predictor._prompts([context]), [target.strip()]
            )
            greedy = self._answers([image], [context], self.predictor.recipe.max_new_tokens)[0]
            out.append((float(logp[0, 0]), greedy == target.strip()))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("adaptkit answers one question per request (generate_until)")


def __getattr__(name: str):
    if name == "AdaptkitLMMS":  # made on first access: it needs lmms-eval, which adaptkit does not require
        from lmms_eval.api.model import lmms

        class AdaptkitLMMS(AdaptkitRequests, lmms):  # ours first: they implement lmms' abstract methods
            """adaptkit in lmms-eval (``--model adaptkit --model_args path=DIR``)."""

            def __init__(self, path: str, batch_size=None, device=None, prompt="run", **kwargs) -> None:
                lmms.__init__(self)
                AdaptkitRequests.__init__(self, path, batch_size, device, prompt)

        globals()[name] = AdaptkitLMMS
        return AdaptkitLMMS
    raise AttributeError(name)
