"""Evaluation: episodes per second of the few-shot protocol against the model's forward pass alone.

On synthetic VOC val images, for each shot count, the same materialised episodes are run:

- **forward only**: the episode inputs built before the clock; the clock covers the
  :class:`fss_core.evaluation.protocol.ModelPredictor` calls alone (inference mode, batch of 1);
- **protocol**: :func:`fss_core.evaluation.protocol.evaluate_episodes` — reading the query and
  support images and labels, the evaluation geometry, the same predictor, the prediction resized
  to the label's size and scored.

The section "evaluation" of docs/benchmarks.md.

    python benchmarks/eval_bench.py            # demo-sized model (129 px, hidden 64), 1 and 5 shots, 100 episodes
    python benchmarks/eval_bench.py --quick    # 65 px, hidden 32, 1 shot, 16 episodes
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
from pathlib import Path

import torch

from harness import RunInfo, interleaved, out_path, parse_timed_arguments, table, write_section

CLASSES = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parse_timed_arguments(parser)
    from fss_core.data.layouts import read_voc
    from fss_core.data.synthetic import synthesize
    from fss_core.evaluation.protocol import (
        EpisodeInput,
        ModelPredictor,
        _load_record,
        binary_target,
        episode_generator,
        evaluate_episodes,
        materialise_episodes,
        to_canvas,
    )
    from fss_core.models.backbones import build_backbone
    from fss_core.models.fss import FSSModelConfig, FSSNetwork

    image_size, hidden, ffn, heads = (65, 32, 64, 4) if args.quick else (129, 64, 192, 8)
    shot_counts, n_episodes = ([1], 16) if args.quick else ([1, 5], 100)
    repeats = args.repeats or (1 if args.quick else 3)
    info = RunInfo()
    work = args.work or Path(tempfile.mkdtemp(prefix="eval-bench-"))
    data = work / "data"
    if not data.is_dir():
        synthesize(data, seed=0, classes=CLASSES, images=96 if args.quick else 240, size=128)
    records = read_voc(data, "val")
    by_id = {r.image_id: r for r in records}
    novel = list(range(1, CLASSES + 1))
    torch.manual_seed(0)
    predictor = ModelPredictor(FSSNetwork(build_backbone("small_cnn"), FSSModelConfig(hidden=hidden, ffn=ffn,
                                                                                       heads=heads)))
    rows = []
    for shots in shot_counts:
        specs = materialise_episodes(records, novel, shots, n_episodes, seed=0, min_area=512)

        def canvas(image_id, spec):
            rgb, label = _load_record(by_id, image_id)
            return to_canvas(rgb, binary_target(label, spec.class_id), image_size)

        def episode_input(spec):
            query = canvas(spec.query_id, spec)
            supports = [canvas(s, spec) for s in spec.support_ids]
            return EpisodeInput(query.image[None], torch.stack([c.image for c in supports])[None],
                                torch.stack([c.mask for c in supports])[None], query.padding[None],
                                torch.stack([c.padding for c in supports])[None])

        inputs = [(spec.index, episode_input(spec)) for spec in specs]

        def forward_only():
            for index, episode in inputs:  # a fresh generator per episode, as the protocol makes
                predictor(dataclasses.replace(episode, generator=episode_generator(0, index)))

        def protocol():
            evaluate_episodes(predictor, specs, by_id, image_size, novel, seed=0)

        forward_only()  # warm-up
        walls = interleaved({"forward": forward_only, "protocol": protocol}, repeats)
        forward, full = n_episodes / walls["forward"], n_episodes / walls["protocol"]
        print(f"{shots}-shot: forward {forward:.1f} episodes/s, protocol {full:.1f} episodes/s, "
              f"ratio {full / forward:.2f}", flush=True)
        rows.append([shots, n_episodes, f"{forward:.1f}", f"{full:.1f}", f"**{full / forward:.2f}**",
                     f"{1000 / full - 1000 / forward:.1f}"])
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    info.finish()
    body = "\n".join([
        info.line("eval_bench.py"),
        "",
        f"One torch thread; CPU; small_cnn backbone with random weights; model hidden {hidden}, ffn {ffn}, heads "
        f"{heads}, canvas {image_size} px; synthetic val images of 128 px. Medians of {repeats} interleaved runs. "
        "*forward only*: the predictor on episode inputs built before the clock. *protocol*: "
        "`evaluate_episodes` on the same episodes (image and label reading, evaluation geometry, predictor, "
        "resize to the label, scoring). *overhead*: protocol time per episode minus forward time per episode.",
        "",
        *table(["shots", "episodes", "forward only episodes/s", "protocol episodes/s", "protocol / forward",
                "overhead ms / episode"], rows, "rrrrrr"),
    ])
    write_section(out_path(args), "evaluation", body)
    print(body)


if __name__ == "__main__":
    main()
