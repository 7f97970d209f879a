"""The recipe schema: every key a recipe may set, its default, its meaning and the values it allows.

This file (with its sections ``adapters.py`` and ``data.py``) is the one place each knob is documented
(``adaptkit recipe show RECIPE`` prints a resolved recipe with these texts beside its values). The defaults
are the embedded default's settings (MobileNetV2 -> Q-Former -> SmolLM2 on easy-VQA) wherever a value does
not depend on the backbones or on what the data allows; what does (the LM layer the image enters, the
vision layers read, the augmentations that keep an answer true) is set by the recipes, with their reasons.
"""

from __future__ import annotations

from dataclasses import dataclass

from adaptkit.config.adapters import AdapterConfig
from adaptkit.config.data import DataConfig
from adaptkit.config.fields import knob, section

DTYPES = ("float32", "bfloat16", "float16")
QUANT = ("none", "8bit", "4bit")


@dataclass
class VisionConfig:
    """The frozen vision backbone (adaptkit/backbones/vision.py)."""

    family: str = knob(
        "torchvision",
        "torchvision | hf (transformers ViT/CLIP/SigLIP) | open_clip | timm (any timm CNN or ViT)",
        choices=("torchvision", "hf", "open_clip", "timm"),
    )
    name: str = knob(
        "mobilenet_v2",
        "torchvision model name, HF hub id or local folder, open_clip architecture, or timm model name",
    )
    weights: str = knob(
        "embedded",
        """embedded (torchvision: the packaged ImageNet MobileNetV2; timm: ImageNet EfficientNet-Lite0 for
        name=tf_efficientnet_lite0) | path to .pth/.safetensors | open_clip or timm pretrained tag (needs
        the hub or its cache) | random""",
    )
    image_size: int = knob(
        224,
        "input resolution in pixels (MobileNetV2: 224 -> a 7x7 grid = 49 image tokens; 128 -> 4x4)",
        low=8,
    )
    feature_layer: int = knob(
        -1,
        """which trunk layer (torchvision), hidden state (hf) or block / stage (timm: -1 forward_features,
        else forward_intermediates' index) gives the image tokens""",
    )
    extra_layers: list[int] = knob(
        [],
        """torchvision and timm CNNs: earlier trunk layers (timm: stages) pooled to the same grid and
        concatenated to the tokens (colour cues the last ImageNet layer keeps only weakly); []: the last
        layer alone""",
    )
    quant: str = knob(
        "none",
        """bitsandbytes quantization of the frozen tower, vision.family=hf only (CNN trunks are convolutions);
        `adaptkit check-quant` shows what it changes before you train""",
        choices=QUANT,
    )
    compute_dtype: str = knob("float32", "matmul dtype of 4-bit layers", choices=DTYPES)
    compile: bool = knob(
        True,
        """encode the images for the feature cache through torch.compile (inductor, weights frozen into the
        graph) on CPU, when at least 2,048 images and views are to be encoded: MobileNetV2 at 224 px on 2
        cores 13 instead of 22 ms per image after a 6-19 s compile (docs/benchmarks.md, "Encoding");
        features round differently from eager ones (~2e-5 of their scale); predict, the demo and small sets
        stay eager.
        Untried on CUDA, where encoding stays eager; false: always eager""",
    )


@dataclass
class LanguageConfig:
    """The frozen causal LM (adaptkit/backbones/language.py)."""

    name: str = knob(
        "embedded:smollm2",
        """embedded:smollm2 | embedded:gemma3-270m (installed on request, README 'Bring your own models') |
        HF hub id | local folder of any causal LM | a .gguf file (converted once into the cache, keyed by its
        sha256)""",
    )
    dtype: str = knob("float32", "weights dtype (float32 is the fast path on CPU)", choices=DTYPES)
    quant: str = knob(
        "none", "bitsandbytes quantization of the frozen LM (NF4 for 4bit; CPU and CUDA)", choices=QUANT
    )
    compute_dtype: str = knob("float32", "matmul dtype of 4-bit layers", choices=DTYPES)


@dataclass
class TextEncoderConfig:
    """The text encoder of the image-text objectives (adaptkit/backbones/text.py)."""

    name: str = knob(
        "none",
        """none (no text side: VQA, captioning) | embedded:minilm (all-MiniLM-L6-v2) | HF hub id | local
        folder of any encoder; frozen, each distinct text encoded once unless lora_r > 0""",
    )
    max_length: int = knob(64, "texts are cut to this many tokens", low=1)
    lora_r: int = knob(
        0,
        """> 0: LoRA of this rank inside the text encoder (peft; its base stays frozen), trained with the
        image-text heads at lr_adapter; 0: frozen""",
        low=0,
    )
    lora_alpha: int = knob(16, "text-encoder LoRA scale numerator (scale = lora_alpha / lora_r)", low=1)
    lora_target_modules: list[str] = knob(
        ["query", "value"], "its linear layers given LoRA (BERT / MiniLM names)"
    )


@dataclass
class LoraConfig:
    """LoRA on the frozen LM, through peft (layers from the image's entry layer up)."""

    enabled: bool = knob(True, "false trains the adapter alone on a fully frozen LM")
    r: int = knob(16, "LoRA rank (the low-rank update's inner width)", low=1)
    alpha: int = knob(32, "LoRA scale numerator (scale = alpha / r)", low=1)
    dropout: float = knob(
        0.0,
        "dropout on the LoRA branch (0 skips a copy of every LoRA input, a faster step)",
        low=0.0,
        below=1.0,
    )
    start_step: int = knob(
        75,
        """LoRA trains from this optimizer step on; before it the adapter alone learns to feed the frozen LM
        (LLaVA-style stage 1; LoRA from step 0 learns answer priors first and slows the use of the image)""",
        low=0,
    )
    target_modules: list[str] = knob(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "LM linear layers given LoRA (Llama / Qwen / Gemma names)",
    )


@dataclass
class ObjectivesConfig:
    """The training loss: a weighted sum of these (adaptkit/objectives.py, adaptkit/contrastive.py)."""

    lm: float = knob(1.0, "generative cross-entropy on the answer / caption tokens", low=0.0)
    classify: float = knob(
        0.0,
        """VQA: answer classification from the mean soft token over the training answers (a direct signal to
        the adapter; the head is not saved)""",
        low=0.0,
    )
    classify_max_answers: int = knob(
        1000, "classes: the most frequent training answers; rarer ones get no label", low=1
    )
    itc: float = knob(0.0, "image-text contrastive (InfoNCE both ways); needs text_encoder.name", low=0.0)
    itm: float = knob(
        0.0, "image-text matching with hard negatives sampled by ITC; needs text_encoder.name", low=0.0
    )
    triplet: float = knob(
        0.0, "max-violation triplet hinge on cosine similarity (VSE++); needs text_encoder.name", low=0.0
    )
    triplet_margin: float = knob(0.2, "the triplet hinge's margin", low=0.0)
    embed_dim: int = knob(256, "width of the shared image-text embedding space (itc / itm / triplet)", low=1)
    temperature: float = knob(
        0.07, "initial ITC temperature (learned; never below 0.01)", above=0.0, below=1.0
    )


@dataclass
class Recipe:
    """A fine-tuning recipe: the task, the parts of the model and every training knob."""

    output_dir: str = knob(
        "runs/default", "where the run directory is written; an existing run is never overwritten"
    )
    seed: int = knob(0, "seeds model init, data order, augmented views and dropout")
    task: str = knob(
        "vqa",
        """what is learned and scored (adaptkit/tasks): vqa (generative, exact-match accuracy) | retrieval
        (image-text objectives, Recall@K and classification) | caption (BLEU-4 / CIDEr-D / ROUGE-L)""",
    )
    vision: VisionConfig = section(VisionConfig, "the frozen vision backbone")
    language: LanguageConfig = section(LanguageConfig, "the frozen causal LM")
    text_encoder: TextEncoderConfig = section(
        TextEncoderConfig, "the text encoder of the image-text objectives"
    )
    adapter: AdapterConfig = section(AdapterConfig, "the trained fusion adapter")
    lora: LoraConfig = section(LoraConfig, "LoRA on the LM")
    data: DataConfig = section(DataConfig, "training and evaluation data")
    objectives: ObjectivesConfig = section(ObjectivesConfig, "the loss: a weighted sum of objectives")
    max_steps: int = knob(1000, "optimizer steps", low=1)
    batch_size: int = knob(
        64,
        """samples per micro-batch per process (N processes train on global batches of N x this, each on its
        slice). 64 rather than 32: a step's fixed costs spread over twice the samples
        (docs/benchmarks.md)""",
        low=1,
    )
    grad_accum_steps: int = knob(1, "micro-batches per optimizer step", low=1)
    max_batch_tokens: int = knob(
        4096,
        """a micro-batch whose LM text slots (rows x its longest row, padding included) pass this many runs
        as row slices within the budget, their gradients accumulated: the same step (the LM loss is a mean
        over answer tokens, weighted per slice) in bounded memory, whatever the texts' length. Easy-VQA's
        batches take ~1,000 slots; 0: no limit. Applies where the LM loss is the only objective (the
        others compare samples across the whole batch)""",
        low=0,
    )
    length_grouping: int = knob(
        8,
        """sort each window of N shuffled batches (or packed rows) by length so a batch pads little (1: plain
        shuffle)""",
        low=1,
    )
    pack_questions: int = knob(
        4,
        """N > 1: up to N questions about one image share one LM sequence behind one copy of its soft tokens,
        each seeing only the image tokens and itself (a block mask; the loss equals the unpacked one). Needs
        soft tokens that depend on the image alone (adapter.qformer.text_conditioned=false) and
        objectives.classify=0; 1: one question per sequence""",
        low=1,
    )
    pack_max_tokens: int = knob(
        128,
        """a packed row takes no further question once its texts would pass this many tokens: long texts
        gain little from sharing soft tokens and their rows' attention grows with the square of the row's
        length (easy-VQA's four questions take ~60 tokens; 0: no limit)""",
        low=0,
    )
    activation_checkpointing: int = knob(
        0,
        """0: off; N: recompute every Nth LM layer's activations in the backward pass: less training memory,
        slower steps (docs/benchmarks.md, "Memory")""",
        low=0,
    )
    compile: bool = knob(
        True,
        """torch.compile each LM decoder layer for the training step (one shared graph, compiled in the first
        step and once more when LoRA starts); evaluation stays eager. Compiled kernels round differently, so a
        run's curve differs from the eager one's; false: eager""",
    )
    lower_states: str = knob(
        "auto",
        """with the image entering at layer k > 0, the k layers below it see text only: keep (their states
        computed once per distinct text and kept, up to lower_state_cache_mb) | recompute (run in every
        step's batch without gradients, nothing kept) | auto: keep when at least half of the run's lookups
        would hit (easy-VQA: 273 texts in 38,575 samples), else recompute (instruction data whose texts do
        not repeat); the log says what it chose and why""",
        choices=("auto", "keep", "recompute"),
    )
    lower_state_cache_mb: float = knob(
        1024.0,
        """memory in MB for those kept text states (easy-VQA's 273 texts take 5.5 MB); when full, training
        keeps what it has and computes later texts each time. Generation (eval, predict, demo) keeps,
        within its own budget of this size, each prompt's states and its keys/values below k (least
        recently used dropped), so prompts run only the upper layers; 0: nothing kept anywhere""",
        low=0.0,
    )
    lr_adapter: float = knob(2.0e-3, "AdamW learning rate of the adapter and the objectives' heads", low=0.0)
    lr_lora: float = knob(
        2.0e-3, "AdamW learning rate of LoRA (its warmup + decay run from lora.start_step)", low=0.0
    )
    weight_decay: float = knob(0.0, "AdamW weight decay", low=0.0)
    warmup_steps: int = knob(15, "linear warmup steps, then cosine decay to 0 at max_steps", low=0)
    lr_decay_steps: int = knob(
        0,
        """0: the cosine decay spans the whole run after warmup; N > 0: the rate holds after warmup and
        decays (cosine) over the last N steps (warmup-stable-decay)""",
        low=0,
    )
    max_grad_norm: float = knob(1.0, "gradient clipping by global norm (0: off)", low=0.0)
    mixed_precision: str = knob(
        "no", "accelerate autocast: no | bf16 | fp16 (bf16 on recent GPUs)", choices=("no", "bf16", "fp16")
    )
    cache_features: bool = knob(True, "encode each image once with the frozen backbone (false: every step)")
    image_workers: int = knob(
        2,
        """DataLoader worker processes that prepare each micro-batch's images ahead of its step: with
        cache_features=false they decode, augment and preprocess them (the backbone encodes them in the
        training process; 1.20x samples/s with 2 against 0 on 2 CPU cores); with the store, on a GPU, they
        read its rows (on CPU the training process reads them: 2 workers measured slower there);
        0: the training process does it all at the step""",
        low=0,
    )
    feature_cache_dir: str = knob(
        "auto",
        """keep those features on disk for later runs, keyed by backbone + image bytes: auto =
        $ADAPTKIT_CACHE/features (~/.cache/adaptkit), a path, or none (memory only). On disk the features
        stay there: each batch reads its rows, so memory does not grow with the number of images""",
    )
    feature_dtype: str = knob(
        "float32",
        """storage dtype of the frozen image features (on disk, or in memory with feature_cache_dir=none); the
        model reads them as float32, and predict, export and the demo round fresh features the same way.
        float16 or bfloat16 halve the store; on the default recipe float16 measured 99.29% / 96.83% / 88.37%
        (test / OOD / OOD-textured) against float32's 99.60% / 98.17% / 92.00%, one run each
        (docs/experiments.md), so float32 is the default""",
        choices=("float16", "bfloat16", "float32"),
    )
    log_every: int = knob(10, "steps between metrics.jsonl lines", low=1)
    report_to: str = knob(
        "none",
        """also send metrics to an Accelerate tracker: none | tensorboard (output_dir/tensorboard) | wandb |
        mlflow | comet_ml | aim | clearml | dvclive | all""",
        choices=("none", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "all"),
    )
    eval_every: int = knob(500, "steps between evaluations during training (0: only at the end)", low=0)
    eval_limit: int = knob(500, "eval samples used during training (0: the whole eval split)", low=0)
    eval_batch_size: int = knob(
        256,
        """generation batch size (prompts sorted by length into batches); decoding a token reads every LM
        weight once per batch, so larger batches amortize it (docs/experiments.md)""",
        low=1,
    )
    max_new_tokens: int = knob(5, "longest generated answer or caption, in tokens", low=1)
    checkpoint_every: int = knob(
        100,
        """steps between checkpoints in output_dir/checkpoints (0: only the one at the end); each holds the
        trained weights, optimizer, scheduler, every process's RNG and the data position""",
        low=0,
    )
    keep_checkpoints: int = knob(
        2, "newest complete checkpoints kept; older ones are deleted after a save", low=1
    )
    resume: str = knob(
        "",
        """"": a new run | auto: continue output_dir from its newest complete checkpoint (a new run when
        output_dir does not exist) | PATH: that checkpoint or run directory""",
    )
    init_from: str = knob(
        "",
        """a run directory whose adapter (and image-text heads) this run starts from, e.g. BLIP-2 stage 2
        from a stage-1 run; "": fresh""",
    )
    log_samples: bool = knob(
        False,
        """write every micro-batch's sample indices and exact loss to samples.jsonl (an audit trail: a resumed
        run's file equals an uninterrupted run's)""",
    )
    check_replicas: int = knob(
        0,
        """multi-process: every N steps compare a digest of each process's trainable weights (the run stops if
        they differ); 0: off""",
        low=0,
    )
