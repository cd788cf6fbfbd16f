"""What the teacher costs per distillation step, and what the teacher cache saves.

What it measures
    The wall time of one distillation training step's teacher side and student side, done three
    ways on the same batches in one process:

    student  the student's forward with labels + the loss parts + backward (no teacher): the floor
    live     the teacher's forward (teacher_targets) + the student's step, as `teacher_cache=false` runs
    cached   a lookup in a TeacherCache built once from the same batches + the student's step, as
             `teacher_cache=true` runs after its first cell
    teacher  the teacher fine-tuned on the same batches (forward with labels + backward + step): what
             distillation is compared with. Same data and epochs, so the ratio of step times is the
             ratio of wall times: distillation (live, or cached + the cache's one teacher pass)
             against fine-tuning the teacher.

    Teacher and student are random-init BERTs of MiniLM's shape (384 wide, 12 heads, MiniLM's
    vocabulary): teacher --teacher-layers, student --student-layers cut from it (first layers);
    pkd's hidden loss on (skip strategy). Batches: --batch random reviews-length token sequences
    (--seq tokens, padded), fixed up front. Steps are interleaved (student, live, cached, ...) so a
    drift of the machine's speed hits all three alike; medians over --steps are reported, and the
    cache's size on disk per example.

Run
    .venv/bin/python benchmarks/distillation.py
    .venv/bin/python benchmarks/distillation.py --teacher-layers 12 --student-layers 6 --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from squeeze.compress import teacher_cache as tc  # noqa: E402
from squeeze.compress.distillation.losses import loss_parts  # noqa: E402
from squeeze.compress.distillation.module import teacher_targets  # noqa: E402
from squeeze.compress.distillation.student import cut_layers, pkd_layer_pairs, student_layer_ids  # noqa: E402


def batches(n: int, batch: int, seq: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
        ids = torch.randint(1000, vocab, (batch, seq), generator=g)
        mask = (torch.arange(seq)[None] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask,
                    "labels": torch.randint(0, 2, (batch,), generator=g)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-layers", type=int, default=6)
    parser.add_argument("--student-layers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=args.teacher_layers,
                        num_attention_heads=12, intermediate_size=1536, num_labels=2)
    teacher = BertForSequenceClassification(config).eval().requires_grad_(False)
    student = cut_layers(teacher, student_layer_ids(args.teacher_layers, args.student_layers, "first")).train()
    student.requires_grad_(True)
    pairs = pkd_layer_pairs(args.teacher_layers, args.student_layers, "skip")
    spec = tc.TargetSpec(level="sequence", pool="first", teacher_layers=tuple(t for t, _ in pairs),
                         student_layers=tuple(s for _, s in pairs), temperature=2.0)
    data = batches(args.steps, args.batch, args.seq, config.vocab_size)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        tc.build(Path(tmp) / "cache", lambda: iter(data), lambda b: teacher_targets(teacher, b, spec), spec, meta={})
        build_s = time.perf_counter() - start
        cache = tc.TeacherCache(Path(tmp) / "cache", spec)

        def step(batch, targets_of):
            t0 = time.perf_counter()
            targets = targets_of(batch)
            out = student(**batch, output_hidden_states=True)
            loss_parts(out, targets, batch, spec, 0.5, 100.0)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad()
            return time.perf_counter() - t0

        tuned = BertForSequenceClassification(config).train()
        tuned.load_state_dict(teacher.state_dict())
        tuned_optimizer = torch.optim.AdamW(tuned.parameters(), lr=1e-5)

        def teacher_step(batch):
            t0 = time.perf_counter()
            tuned(**batch).loss.backward()
            tuned_optimizer.step()
            tuned_optimizer.zero_grad()
            return time.perf_counter() - t0

        times: dict[str, list[float]] = {"student": [], "live": [], "cached": [], "teacher": []}
        cached_targets = {id(b): cache.targets(b) for b in data}  # the floor: targets already in memory
        for batch in data:
            times["student"].append(step(batch, lambda b: cached_targets[id(b)]))
            times["live"].append(step(batch, lambda b: teacher_targets(teacher, b, spec)))
            times["cached"].append(step(batch, cache.targets))
            times["teacher"].append(teacher_step(batch))
        size = cache.nbytes

    print(f"teacher {args.teacher_layers} layers -> student {args.student_layers}, batch {args.batch}x{args.seq}, "
          f"{args.steps} steps, {torch.get_num_threads()} threads")
    for name, values in times.items():
        print(f"  {name:8s} median {1000 * statistics.median(values):8.1f} ms/step")
    live, cached = statistics.median(times["live"]), statistics.median(times["cached"])
    print(f"  cache: built in {build_s:.2f} s, {size / (args.steps * args.batch):.0f} bytes/example, "
          f"step time cached/live = {cached / live:.2f}")
    # Wall time over the same data and epochs, per step: the cache's build is one teacher pass over the data.
    tuned = statistics.median(times["teacher"])
    build_per_step = build_s / args.steps
    for epochs in (1, 3):
        print(f"  {epochs} epoch(s): distillation / teacher fine-tune wall time = live {live / tuned:.2f}, "
              f"cached {(cached + build_per_step / epochs) / tuned:.2f}")


if __name__ == "__main__":
    main()
