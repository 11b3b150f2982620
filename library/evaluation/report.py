"""What eval_pfg.py shows and writes: the table, eval.json and the contact sheet."""
from __future__ import annotations

from pathlib import Path

from library.data.images import load_image
from library.fileio import write_json
from library.sample.image_outputs import contact_sheet, save_png


def format_table(result: dict) -> str:
    d = result["denoising"]
    gain, ret = d["gain"], d["retrieval"]
    lines = [
        f"{len(result['images'])} held-out images, {len(d['timesteps'])} timesteps, K = {d['candidates']} candidates, seed {result['seed']}",
        f"{'metric':24s} {'value':>10s}   reference",
        f"{'loss, own vector':24s} {d['loss_own']:10.5f}",
        f"{'loss, other vectors':24s} {d['loss_shuffled']:10.5f}",
        f"{'conditioning gain':24s} {gain['mean']:10.5f}   95% [{gain['low']:.5f}, {gain['high']:.5f}]"
        + ("  above zero" if gain["above_zero"] else "  includes zero or below"),
        f"{'denoising retrieval':24s} {ret['top1']:10.3f}   chance {ret['chance']:.3f} ({ret['ratio']:.1f}x)",
    ]
    generation = result["generation"]
    if generation:
        for key, label in (("encoder", "encoder"), ("second_encoder", "second encoder")):
            g = generation[key]
            if g is None:
                continue
            lines += [
                f"{'generation, ' + label:24s} {g['top1']:10.3f}   chance {g['chance']:.3f} ({g['ratio']:.1f}x)",
                f"{'  cosine own / others':24s} {g['own_similarity']:10.4f}   {g['other_similarity']:.4f}",
            ]
    return "\n".join(lines)


def write_outputs(settings, result: dict, items: list, generated: list) -> None:
    if settings.output_json:
        write_json(Path(settings.output_json), result)
        print(f"wrote {settings.output_json}")
    if settings.contact_sheet:
        rows = [(load_image(item.image_path), images) for item, images in zip(items, generated)]
        labels = [item.image_path.stem for item in items]
        path = Path(settings.contact_sheet)
        save_png(contact_sheet(rows, cell=160, label_rows=labels), path, "contact sheet: held-out guide image, then what the model generated from it")
        print(f"wrote {path}")
