"""Kill-and-resume reliability of `examples/train_text_to_image.py`: SIGKILL while a checkpoint is being written, resume
with `--resume_from_checkpoint latest`, and compare with an uninterrupted run.

For each configuration (full fine-tune and LoRA; one process, and two processes through `accelerate launch` on gloo)
one uninterrupted run gives the reference loss history. Then one run is killed `--kills` times: each start (the first
fresh, the others with `--resume_from_checkpoint latest`) is killed with SIGKILL (the launcher and every worker) a
random 0 to `--max_delay_ms` ms after a randomly chosen later checkpoint starts being written (its
`checkpoint-<N>.tmp/` folder appears), so inside the save or just after it; a last start runs to the end. After each
kill every checkpoint on disk is checked (each file present and readable) and its loss history compared with the
reference's first N steps; at the end the whole history is compared with the reference, bit for bit.

Reported per configuration: kills, kills that landed inside a save (a `checkpoint-<N>.tmp/` being written or an old
checkpoint being deleted, `.delete`, at the kill: those folders are never read and are removed at the next start),
starts that resumed and trained on, checkpoints corrupted (present but unreadable), leftovers after the last start
(`*.tmp`, `*.delete` or `abandoned-*` folders), and loss histories identical to the uninterrupted run. Targets:
>= 20 kills, 0 runs lost, 0 corrupted, 0 leftovers, every history identical.

    python benchmarks/bench_kill_resume.py [--kills 5] [--steps 12] [--configs full-1,lora-1,full-2,lora-2]
"""

import argparse
import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, not an installed copy

SCRIPT = REPO / "examples" / "train_text_to_image.py"
COLORS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (240, 240, 240)]


# ----------------------------------------------------------------------------------------------------------------------
# Tiny assets: a random 2-layer Llama wrapped as a pixel-space MonoFormer, 8 coloured 16x16 images with captions
# ----------------------------------------------------------------------------------------------------------------------
def make_assets(root: pathlib.Path) -> dict:
    import torch
    from PIL import Image

    from modeling_monoformer import MonoFormerForConditionalGeneration, MonoFormerImageProcessor, MonoFormerProcessor
    from tests.conftest import make_tokenizer, tiny_llama

    tok = make_tokenizer()
    model = MonoFormerForConditionalGeneration.from_llm(
        tiny_llama(vocab_size=len(tok)), tokenizer=tok, latent_channels=3, vae_scale_factor=1, patch_size=2,
        sample_size=8,
    )
    base = root / "base"
    model.save_pretrained(base)
    MonoFormerProcessor(MonoFormerImageProcessor(), tok).configure_for_model(model.config).save_pretrained(base)
    images = root / "images"
    images.mkdir()
    rows = []
    for i in range(8):
        img = Image.new("RGB", (16, 16))
        img.paste(COLORS[i % 4], (4, 4, 12, 12) if i % 2 == 0 else (0, 6, 16, 10))
        img.save(images / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": f"shape {i % 4} {'square' if i % 2 == 0 else 'bar'}"})
    (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.set_num_threads(1)
    return {"base": base, "images": images}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(assets, out, lora: bool, processes: int, steps: int, resume: bool) -> list[str]:
    args = [
        "--pretrained_model_name_or_path", str(assets["base"]), "--train_data_dir", str(assets["images"]),
        "--output_dir", str(out), "--train_batch_size", str(4 // processes), "--max_train_steps", str(steps),
        "--learning_rate", "3e-3", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
        "--validation_steps", "0", "--num_inference_steps", "1", "--logging_steps", "0", "--seed", "0",
        "--cache_dir", str(assets["base"].parent / "latent_cache"),
    ]
    if lora:
        args += ["--lora_rank", "4"]
    if resume:
        args += ["--resume_from_checkpoint", "latest"]
    if processes == 1:
        return [sys.executable, str(SCRIPT), *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(SCRIPT), *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def run_to_end(cmd, timeout=600) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{proc.stderr[-3000:]}")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` and every process under it at once. `accelerate launch` (torch elastic) starts each worker in its
    own session, so killing the launcher's process group would leave the workers running."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)
    proc.wait()


def run_and_kill(cmd, out: pathlib.Path, target: int, max_delay_s: float, rng: random.Random) -> bool:
    """Start `cmd`; SIGKILL it and all its workers a random moment after checkpoint `target` starts being written.
    Returns whether the kill landed inside a save (a `.tmp` folder was there just before it)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    try:
        while proc.poll() is None:
            steps = [int(p.name[len("checkpoint-"):].split(".")[0]) for p in out.glob("checkpoint-*")] if out.is_dir() \
                else []
            if any(s >= target for s in steps):
                time.sleep(rng.uniform(0, max_delay_s))
                inside = bool(list(out.glob("checkpoint-*.tmp")) + list(out.glob("checkpoint-*.delete")))
                kill_tree(proc)
                return inside
            time.sleep(0.001)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    raise RuntimeError(f"the run ended before checkpoint {target} (exit code {proc.returncode})")


def histories_match(out: pathlib.Path, expected: list[dict]) -> tuple[int, int, float]:
    """(checkpoints whose loss history equals the reference's first N steps, checkpoints, max abs difference)."""
    same, total, worst = 0, 0, 0.0
    for folder in out.glob("checkpoint-*"):
        if not re.fullmatch(r"checkpoint-\d+", folder.name):
            continue
        history = json.loads((folder / "loss_history.json").read_text())
        total += 1
        same += history == expected[: len(history)]
        worst = max([worst] + [abs(a[k] - b[k]) for a, b in zip(history, expected)
                               for k in ("loss", "lm_loss", "diffusion_loss") if a.get(k) is not None])
    return same, total, worst


def corrupted_checkpoints(out: pathlib.Path, processes: int, lora: bool) -> list[str]:
    """Names of the complete-looking `checkpoint-<N>/` folders with a file missing or unreadable."""
    import torch
    from accelerate.utils import load
    from safetensors.torch import load_file

    bad = []
    for folder in sorted(out.glob("checkpoint-*")):
        if not re.fullmatch(r"checkpoint-\d+", folder.name):  # `.tmp` / `.delete`: never read, removed at next start
            continue
        try:
            weights = folder / ("adapter/adapter_model.safetensors" if lora else "model.safetensors")
            load_file(weights)
            for name in ("optimizer.bin", "scheduler.bin"):
                torch.load(folder / name, weights_only=True)
            for rank in range(processes):
                load(folder / f"random_states_{rank}.pkl")
            json.loads((folder / "loss_history.json").read_text())
            json.loads((folder / "training_state.json").read_text())
        except Exception as err:  # any missing or unreadable file makes the checkpoint corrupt
            bad.append(f"{folder.name}: {type(err).__name__}")
    return bad


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5, help="kills per configuration")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (one checkpoint per step)")
    parser.add_argument("--configs", default="full-1,lora-1,full-2,lora-2", help="<full|lora>-<processes>, ...")
    parser.add_argument("--max_delay_ms", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default=None, help="keep the run folders here (default: a deleted temp folder)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="kill-resume-"))
    root.mkdir(parents=True, exist_ok=True)
    assets = make_assets(root)
    start = time.time()

    rows = []
    for name in args.configs.split(","):
        kind, processes = name.split("-")
        lora, processes = kind == "lora", int(processes)
        reference = root / f"{name}-reference"
        run_to_end(command(assets, reference, lora, processes, args.steps, resume=False))
        expected = json.loads((reference / "loss_history.json").read_text())
        row = {"config": name, "kills": 0, "inside": 0, "resumed": 0, "corrupted": 0, "leftovers": 0,
               "checkpoints_same": 0, "checkpoints": 0, "final_same": 0, "max_diff": 0.0}
        # One run killed `--kills` times: each start (the first fresh, then `--resume_from_checkpoint latest`) is
        # killed at a random checkpoint after the one it resumed from; a last start runs to the end.
        out = root / f"{name}-killed"
        targets = sorted(rng.sample(range(1, args.steps), args.kills))
        for i, target in enumerate(targets):
            inside = run_and_kill(command(assets, out, lora, processes, args.steps, resume=i > 0), out, target,
                                  args.max_delay_ms / 1000, rng)
            row["kills"] += 1
            row["inside"] += inside
            row["resumed"] += i > 0  # this start resumed and trained on to the next kill
            bad = corrupted_checkpoints(out, processes, lora)
            row["corrupted"] += len(bad)
            same, total, worst = histories_match(out, expected)
            row["checkpoints_same"] += same
            row["checkpoints"] += total
            row["max_diff"] = max(row["max_diff"], worst)
            print(f"{name}: killed at checkpoint {target} ({'inside' if inside else 'after'} the save); corrupted "
                  f"{bad}; {same}/{total} checkpoint histories equal the reference", file=sys.stderr, flush=True)
        try:
            run_to_end(command(assets, out, lora, processes, args.steps, resume=True))
            row["resumed"] += 1
        except RuntimeError as err:
            print(f"{name}: the last resume failed: {err}", file=sys.stderr)
        leftovers = [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".delete")) or p.name.startswith(
            "abandoned-")]
        row["leftovers"] += len(leftovers)
        history = json.loads((out / "loss_history.json").read_text())
        row["final_same"] = int(history == expected)
        rows.append(row)
        print(f"{name}: {row}", file=sys.stderr, flush=True)

    keys = ("kills", "inside", "resumed", "corrupted", "leftovers", "checkpoints_same", "checkpoints", "final_same")
    total = {k: sum(r[k] for r in rows) for k in keys}
    print(f"\n{len(rows)} configurations x {args.kills} kills, {args.steps} steps per run (a checkpoint every step, "
          f"--checkpoints_total_limit 2), {time.time() - start:.0f} s in all\n")
    print("| configuration | kills | inside a save | runs resumed | checkpoints corrupted | leftovers | checkpoint "
          "histories = reference | final history = reference | max abs loss diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows + [{**total, "config": "**total**", "max_diff": max(r["max_diff"] for r in rows)}]:
        print(f"| {r['config']} | {r['kills']} | {r['inside']} | {r['resumed']}/{r['kills']} | {r['corrupted']} "
              f"| {r['leftovers']} | {r['checkpoints_same']}/{r['checkpoints']} | {r['final_same']}/"
              f"{len(rows) if r['config'] == '**total**' else 1} | {r['max_diff']:.1e} |")
    met = (total["kills"] >= 20 and total["resumed"] == total["kills"] and total["corrupted"] == 0
           and total["leftovers"] == 0 and total["checkpoints_same"] == total["checkpoints"]
           and total["final_same"] == len(rows))
    target = ">= 20 kills, 0 lost, 0 corrupted, 0 leftovers, identical histories"
    print(f"\ntarget ({target}): {'met' if met else 'MISSED'}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
