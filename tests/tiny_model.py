"""A tiny random chat model for tests that need a real transformers model but not a real language model.

Built fully offline in about a second, so any test (backend, pipeline, CLI) can run the whole local path:
chat template, batched generation, LoRA training, adapters. Its text is gibberish; tests compare outputs with
each other, or train it to say something, rather than expect anything sensible from it.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", EOS_TOKEN)

# Plain ChatML, no default system message: what `<|im_start|>role\n...<|im_end|>\n` means, nothing more.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Enough text for a few hundred BPE merges; every printable ASCII character also reaches the vocabulary
# through the byte-level alphabet, so any prompt tokenizes.
_CORPUS = (
    "What is the result of 12+7? Make sure to state your answer at the end of the response.",
    "The answer is 19. The answer is 42. The result is 3.",
    "Can you solve the following math problem? Provide a bullet point summary of your reasoning.",
    "Here are a list of opinions from different agents: One agent response: the answer is 7.",
    "Examine each these solutions as additional advice and give your updated answer.",
    "0123456789 + - * / = ( ) \\boxed{42}",
    "<|im_start|>system\n<|im_start|>user\n<|im_start|>assistant\n",
    string.printable,
)


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained in-process: byte-level so nothing is ever unknown, BPE so prompts stay short."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
        chat_template=CHATML_TEMPLATE,
        padding_side="right",
        model_max_length=1024,
    )


def build_tiny_model(
    path: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    initializer_range: float = 0.3,
) -> Path:
    """Save a random Llama-architecture causal LM and its tokenizer to `path`; returns `path`.

    Same architecture family as SmolLM2 (Llama, grouped-query attention, tied embeddings), so the LoRA target
    modules (`q_proj`, `k_proj`, `v_proj`, `o_proj`) and code paths are the real ones. The seed makes the
    weights, hence every greedy output, reproducible across runs.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    eos_id = tokenizer.get_vocab()[EOS_TOKEN]
    bos_id = tokenizer.get_vocab()["<|im_start|>"]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=1024,
        initializer_range=initializer_range,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        # No pad_token_id: it would become the embedding's padding_idx, a zero row that (tied to the output
        # layer) pins the logit of <|im_end|> at 0, so no adapter could ever learn to stop.
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_random_adapter(
    model_dir: Path,
    path: Path,
    *,
    seed: int = 0,
    rank: int = 4,
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
) -> Path:
    """Save a LoRA adapter for the model at `model_dir` whose B is random, not zero, to `path`; returns `path`.

    A freshly initialised LoRA adapter is a no-op (B = 0); this one changes the outputs at once, which is what
    tests of "each row gets its own adapter" need without paying for training.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=list(target_modules),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(model, config).save_pretrained(str(path))
    return Path(path)
