"""What eval_pfg.py shows and writes: the table (with its legend), eval.json and the contact sheet.

The table's labels are eval.json's keys, so a number on screen is found in the file by its name.
Each metric says its chance level and whether it passes; the legend says what each one measures.
"""
from __future__ import annotations

from pathlib import Path

from library.data.images import load_image
from library.evaluation.metrics import DenoisingReport, Retrieval, SimilarityReport
from library.fileio import write_json
from library.sample.image_outputs import SheetRow, contact_sheet, save_png

# A retrieval passes at this many times chance (at most: every image right). Denoising compares
# the own vector with K-1 others directly, so it must clear a higher bar than generation, which
# goes through sampling, the VAE and the encoder.
PASS_RATIO = {"denoising_retrieval": 3.0, "generation_retrieval": 2.0, "generation_retrieval_second": 2.0}

LEGEND = {
    "loss_own": "denoising loss of each held-out image with its own PFG vector (the training objective; fixed seeded noise and timesteps)",
    "loss_other": "the same loss with the other candidates' vectors instead (mean over the K-1); text, noise and timesteps unchanged",
    "conditioning_gain": "loss_other - loss_own: how much the right image vector helps the model denoise (chance: 0). "
                         "pass: the 95% bootstrap interval over images lies above 0; its size is relative to loss_other",
    "denoising_retrieval": "fraction of images whose own vector gives the lowest loss of the K candidates (chance: 1/K). "
                           f"pass: at least {PASS_RATIO['denoising_retrieval']:g}x chance",
    "generation_retrieval": "fraction of the generated images whose most similar guide (cosine of the encoder's vectors) is the guide they "
                            "were generated from (chance: 1/guides), measured with --tagger_model, the encoder the PFG head reads. "
                            f"pass: at least {PASS_RATIO['generation_retrieval']:g}x chance. "
                            "own_similarity / other_similarity: mean cosine to the own guide / to the others; per_guide: hits of each guide",
    "generation_retrieval_second": "generation_retrieval measured with --second_encoder, an encoder the model never saw "
                                   "(IP-Adapter's CLIP-I when it is a CLIP model); same pass rule",
}


def build_result(settings, items: list, encoder_id: str | None, denoising: DenoisingReport, generation) -> dict:
    """Everything eval.json holds: what was measured, with what, and each metric under its printed label."""
    names = [item.image_path.name for item in items]
    gain = denoising.gain
    result = {
        "model": settings.pretrained_model_name_or_path,
        "pfg_weights": settings.pfg_weights,
        "encoder": encoder_id,
        "images": names,
        "seed": settings.seed,
        "denoising": {"timesteps": denoising.timesteps, "candidates": denoising.candidates},
        "generation": None,
        "loss_own": denoising.loss_own,
        "loss_other": denoising.loss_shuffled,
        "conditioning_gain": {
            "value": gain.mean, "low": gain.low, "high": gain.high, "chance": 0.0,
            "relative": gain.mean / denoising.loss_shuffled if denoising.loss_shuffled else None, "pass": gain.above_zero,
        },
        "denoising_retrieval": _retrieval("denoising_retrieval", denoising.retrieval),
        "generation_retrieval": None,
        "generation_retrieval_second": None,
        "legend": LEGEND,
    }
    if generation is not None:
        result["generation"] = {
            "prompt": settings.prompt, "sizes": generation.sizes, "steps": settings.steps, "scale": settings.scale,
            "sampler": settings.sampler, "images_per_guide": settings.images_per_guide,
        }
        result["generation_retrieval"] = _similarity("generation_retrieval", generation.retrieval, generation.encoder_id, names)
        if generation.second is not None:
            result["generation_retrieval_second"] = _similarity("generation_retrieval_second", generation.second, generation.second_id, names)
    return result


def _retrieval(label: str, retrieval: Retrieval) -> dict:
    needed = min(1.0, PASS_RATIO[label] * retrieval.chance)
    return {"value": retrieval.top1, "chance": retrieval.chance, "ratio": retrieval.ratio, "pass": retrieval.top1 >= needed - 1e-9}


def _similarity(label: str, report: SimilarityReport, encoder_id: str, names: list[str]) -> dict:
    per_guide = {name: {"hits": hits, "images": images} for name, (hits, images) in zip(names, report.per_guide(len(names)))}
    return {
        **_retrieval(label, report.retrieval), "encoder": encoder_id,
        "own_similarity": report.own_similarity, "other_similarity": report.other_similarity, "per_guide": per_guide,
    }


def format_table(result: dict) -> str:
    d, g = result["denoising"], result["generation"]
    header = f"{len(result['images'])} held-out images, seed {result['seed']}; denoising: {len(d['timesteps'])} timesteps, K = {d['candidates']} candidates"
    if g:
        header += f"; generation: {g['images_per_guide']} images per guide, {g['steps']} steps, CFG {g['scale']:g}"
    lines = [header, f"{'':28s} {'value':>9s} {'chance':>7s}  pass"]

    def row(label: str, value: str, chance: str = "", verdict: str = "", note: str = "") -> None:
        lines.append(f"{label:28s} {value:>9s} {chance:>7s}  {verdict:4s}  {note}".rstrip())

    row("loss_own", f"{result['loss_own']:.5f}")
    row("loss_other", f"{result['loss_other']:.5f}")
    gain = result["conditioning_gain"]
    relative = f"; {100 * gain['relative']:.1f}% of loss_other" if gain["relative"] is not None else ""
    row("conditioning_gain", f"{gain['value']:.5f}", "0", _verdict(gain), f"95% interval [{gain['low']:.5f}, {gain['high']:.5f}]{relative}")
    ret = result["denoising_retrieval"]
    row("denoising_retrieval", f"{ret['value']:.3f}", f"{ret['chance']:.3f}", _verdict(ret), f"{ret['ratio']:.1f}x chance")
    for label, flag in (("generation_retrieval", "--tagger_model"), ("generation_retrieval_second", "--second_encoder")):
        s = result[label]
        if s is None:
            continue
        row(label, f"{s['value']:.3f}", f"{s['chance']:.3f}", _verdict(s), f"{s['ratio']:.1f}x chance; encoder {s['encoder']} ({flag})")
        row("  own_similarity", f"{s['own_similarity']:.4f}")
        row("  other_similarity", f"{s['other_similarity']:.4f}")
        hits = ", ".join(f"{Path(name).stem} {c['hits']}/{c['images']}" for name, c in s["per_guide"].items())
        row("  per_guide", "", note=hits)
    lines.append("legend (the labels are eval.json's keys):")
    shown = [label for label in LEGEND if label in ("loss_own", "loss_other") or result.get(label) is not None]
    lines += [f"  {label}: {LEGEND[label]}" for label in shown]
    return "\n".join(lines)


def _verdict(metric: dict) -> str:
    return "yes" if metric["pass"] else "no"


def write_outputs(settings, result: dict, items: list, generation) -> None:
    if settings.output_json:
        write_json(Path(settings.output_json), result)
        print(f"wrote {settings.output_json}")
    if settings.contact_sheet:
        path = Path(settings.contact_sheet)
        save_png(contact_sheet(_sheet_rows(result, items, generation), cell=160), path,
                 "contact sheet: each held-out guide image, then what the model generated from it; "
                 "under each generated image, the guide it is most similar to (generation_retrieval)")
        print(f"wrote {path}")


def _sheet_rows(result: dict, items: list, generation) -> list[SheetRow]:
    """A row per guide, titled with its hits; each generated image labelled with its seed and the
    guide the encoder finds it nearest to, so a failing guide shows what it turned into."""
    names = [item.image_path.stem for item in items]
    per_guide = result["generation_retrieval"]["per_guide"]
    nearest = iter(generation.retrieval.nearest)
    rows = []
    for i, (item, images, seeds) in enumerate(zip(items, generation.generated, generation.seeds)):
        counts = per_guide[item.image_path.name]
        labels = tuple(f"seed {seed} -> {names[next(nearest)]}" for seed in seeds)
        rows.append(SheetRow(load_image(item.image_path), images, title=f"{names[i]}: {counts['hits']}/{counts['images']} nearest their own guide",
                             guide_label=f"{names[i]} (guide)", result_labels=labels))
    return rows
