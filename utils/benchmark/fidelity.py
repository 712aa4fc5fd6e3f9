"""Is every pipeline's image the image diffusers makes for the same seed?"""

from __future__ import annotations

import numpy as np

# The diffusers contenders, the one to compare with first: plain diffusers where it ran (the
# compiled recipes fuse projections and reorder arithmetic, which moves pixels a little).
REFERENCES = ("diffusers", "diffusers-compiled", "diffusers-fast")


def reference_of(names) -> str | None:
    """The diffusers contender that ran to compare the others with, if any did."""
    return next((name for name in REFERENCES if name in names), None)


def fidelity(images: dict[str, np.ndarray]) -> dict:
    """Each pipeline's image (same seed) against diffusers' (``reference_of``): PSNR, and whether
    it is a real image."""
    report, reference = {}, reference_of(images)
    for name, image in images.items():
        entry = {"finite_and_not_constant": bool(image.std() > 0)}
        if reference is not None and name != reference:
            mse = float(np.mean((image.astype(np.float64) - images[reference].astype(np.float64)) ** 2))
            entry["reference"] = reference
            entry["psnr_db_vs_diffusers"] = None if mse == 0 else 10 * np.log10(255**2 / mse)  # None: identical
            entry["max_pixel_difference"] = int(np.abs(image.astype(int) - images[reference]).max())
        report[name] = entry
    return report


def fidelity_problems(results: dict, min_psnr_db: float) -> list[str]:
    """What fails the fidelity check: a blank or constant image, or PSNR below ``min_psnr_db``
    against diffusers (identical images have no PSNR: they pass)."""
    problems = []
    for name, entry in results.get("fidelity", {}).items():
        if not entry["finite_and_not_constant"]:
            problems.append(f"{name}: the image is constant (or not finite)")
        psnr = entry.get("psnr_db_vs_diffusers")
        if psnr is not None and not psnr >= min_psnr_db:
            problems.append(f"{name}: PSNR {psnr:.1f} dB vs {entry['reference']}, below {min_psnr_db} dB")
    if results.get("fidelity") and reference_of(results["fidelity"]) is None:
        problems.append(f"no diffusers image to compare with: include one of the contenders {', '.join(REFERENCES)}")
    return problems


def fidelity_text(name: str, entry: dict) -> str:
    if "psnr_db_vs_diffusers" not in entry:
        return f"{name} (reference)"
    psnr = entry["psnr_db_vs_diffusers"]
    return (f"{name} {'identical' if psnr is None else f'PSNR {psnr:.1f} dB'}, "
            f"max pixel difference {entry['max_pixel_difference']}")
