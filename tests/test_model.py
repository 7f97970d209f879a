from __future__ import annotations

import torch

from adaptkit.data.collate import VQADataset, collate_prompts, collate_train
from adaptkit.data.formats import load_jsonl
from adaptkit.model import build_model
from adaptkit.model.trainables import load_trainables, save_trainables
from adaptkit.recipes import load_recipe
from tests.conftest import AT_INPUT, loss_of


def _setup(tiny_overrides, tiny_vqa):
    recipe = load_recipe("recipes/easyvqa_qformer_lora.yaml", tiny_overrides)
    torch.manual_seed(0)
    model = build_model(recipe)
    # Make LoRA non-trivial (lora_B starts at zero) so the checks below cover the LoRA path.
    for name, param in model.lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    samples = load_jsonl(tiny_vqa).samples
    rows = {path: i for i, path in enumerate(dict.fromkeys(s.image for s in samples))}
    dataset = VQADataset(samples, rows, model.tokenizer, recipe.data.prompt_template)
    feats = torch.randn(len(rows), 4, 1280)
    return recipe, model.eval(), dataset, feats


def _generate_alone(model, feats, item, max_new_tokens=3) -> tuple[str, float]:
    """One sample's greedy answer and its probability, generated in a batch of its own."""
    one = collate_prompts([item], model.tokenizer.pad_token_id)
    answers, scores = model.generate(
        feats[one["image"]], one["input_ids"], one["attention_mask"], max_new_tokens
    )
    return answers[0], scores[0]


def test_target_only_loss_matches_full_logit_loss(tiny_overrides, tiny_vqa):
    _, model, dataset, feats = _setup(tiny_overrides, tiny_vqa)
    batch = collate_train([dataset[i] for i in (0, 1, 2, 5)], model.tokenizer.pad_token_id)
    f = feats[batch["image"]]
    ours = loss_of(model, f, batch["input_ids"], batch["attention_mask"], batch["labels"])
    prompt_mask = batch["attention_mask"] * (batch["labels"] == -100)
    inp = model.lm_input(f, batch["input_ids"], batch["attention_mask"], prompt_mask)
    lead = torch.full((len(f), inp.n_lead), -100)
    # The stock causal-LM call, the image carried to the layers as the model's passes carry it.
    reference = model.lm(
        inputs_embeds=inp.embeds,
        attention_mask=inp.mask,
        labels=torch.cat([lead, batch["labels"]], 1),
        **inp.kwargs(),
    )
    torch.testing.assert_close(ours, reference.loss, atol=1e-5, rtol=1e-5)


def test_generation_is_padding_invariant(tiny_overrides, tiny_vqa):
    _, model, dataset, feats = _setup(tiny_overrides, tiny_vqa)
    items = [dataset[i] for i in (0, 2, 3)]  # prompts of different lengths
    assert len({len(it["prompt"]) for it in items}) > 1
    batch = collate_prompts(items, model.tokenizer.pad_token_id)
    answers, scores = model.generate(feats[batch["image"]], batch["input_ids"], batch["attention_mask"], 3)
    for i, item in enumerate(items):
        alone, alone_score = _generate_alone(model, feats, item)
        assert alone == answers[i]
        assert abs(alone_score - scores[i]) < 1e-4
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_predict_batches_by_length_and_answers_in_dataset_order(tiny_overrides, tiny_vqa):
    """`evaluation.generate_texts` sorts prompts by length into batches and puts the answers back in order."""
    from adaptkit.evaluation import generate_texts

    _, model, dataset, feats = _setup(tiny_overrides, tiny_vqa)
    lengths = [len(dataset[i]["prompt"]) for i in range(len(dataset))]
    assert lengths != sorted(lengths)  # the order matters

    class Bank:
        def lookup(self, rows):
            return feats[rows]

    answers, scores = generate_texts(model, dataset, Bank(), batch_size=3, max_new_tokens=3, progress=False)
    assert len(answers) == len(dataset)
    for i in range(len(dataset)):
        alone, alone_score = _generate_alone(model, feats, dataset[i])
        assert alone == answers[i]
        assert abs(alone_score - scores[i]) < 1e-4


def test_save_and_load_trainables_round_trip(tiny_overrides, tiny_vqa, tmp_path):
    recipe, model, dataset, feats = _setup(tiny_overrides, tiny_vqa)
    batch = collate_train([dataset[i] for i in range(4)], model.tokenizer.pad_token_id)
    args = (feats[batch["image"]], batch["input_ids"], batch["attention_mask"], batch["labels"])
    before = loss_of(model, *args)
    save_trainables(model, tmp_path)
    assert (tmp_path / "adapter.safetensors").is_file()
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    fresh = build_model(recipe, lora_dir=tmp_path / "lora").eval()
    load_trainables(fresh, tmp_path)
    torch.testing.assert_close(loss_of(fresh, *args), before)


def test_text_conditioned_adapter_reads_the_prompt_but_never_the_answer(tiny_overrides, tiny_vqa):
    _, model, dataset, feats = _setup([*tiny_overrides, *AT_INPUT], tiny_vqa)
    batch = collate_train([dataset[i] for i in (0, 1)], model.tokenizer.pad_token_id)
    f = feats[batch["image"]]
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    prompt_mask = mask * (labels == -100)
    inp = model.lm_input(f, ids, mask, prompt_mask)
    soft, n_soft = inp.embeds, inp.n_lead
    assert n_soft == model.adapter.num_tokens  # at the LM's input: the soft tokens lead the sequence
    # Changing an answer token must not change the soft tokens (no leak of the target into the adapter).
    changed = ids.clone()
    changed[labels != -100] = model.tokenizer.convert_tokens_to_ids("blue")
    soft_changed = model.lm_input(f, changed, mask, prompt_mask).embeds
    torch.testing.assert_close(soft_changed[:, :n_soft], soft[:, :n_soft])
    # Changing a question token does change them.
    other = ids.clone()
    other[:, 1] = model.tokenizer.convert_tokens_to_ids("circle")
    soft_other = model.lm_input(f, other, mask, prompt_mask).embeds
    assert not torch.allclose(soft_other[:, :n_soft], soft[:, :n_soft])


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_overrides):
    feats = torch.randn(2, 4, 1280)
    ids = torch.tensor([[5, 6, 7, 8], [6, 7, 8, 9]])
    labels = torch.tensor([[-100, -100, 8, 9], [-100, -100, -100, 4]])
    results = []
    for every in (0, 1):
        torch.manual_seed(0)
        recipe = load_recipe(
            "recipes/easyvqa_qformer_lora.yaml", [*tiny_overrides, f"activation_checkpointing={every}"]
        )
        model = build_model(recipe).train()
        layers = model.base_lm.get_decoder().layers
        assert all(layer.gradient_checkpointing == bool(every) for layer in layers)
        loss = loss_of(model, feats, ids, torch.ones_like(ids), labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.trainable_parameters()}))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss0, loss1)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads0[name], grads1[name], rtol=1e-5, atol=1e-6)
