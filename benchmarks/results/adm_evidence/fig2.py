"""The ADM paper's Fig. 2 question on the embedded dataset: do the regions where teacher and student
agree (S at or above its image mean, where A_co >= 1) fall on the object, epoch by epoch?

Reads the ``iou.json`` that ``kdengine viz RUN --only iou`` wrote into each run of the ADM evidence
sweep (seed 0, one checkpoint kept per epoch: train.keep_checkpoints=true), copies them here and
draws ``fig2_iou.png``. Usage, from the repository root:

    for r in dml dml+adm; do kdengine viz "benchmarks/sweeps/adm-evidence/train.seed=0_method.name=$r" --only iou; done
    kdengine viz "benchmarks/sweeps/adm-evidence/train.seed=0_method.options.adm=gamma-0.0" --only iou
    python benchmarks/results/adm_evidence/fig2.py
"""
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
SWEEP = HERE.parents[1] / "sweeps" / "adm-evidence"
RUNS = {"DML": "train.seed=0_method.name=dml", "DML+ADM (γ=1)": "train.seed=0_method.name=dml+adm",
        "DML+ADM, γ=0 (L_co + L_di only)": "train.seed=0_method.options.adm=gamma-0.0"}


def main() -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True, sharey=True)
    for label, run in RUNS.items():
        source = SWEEP / run / "iou.json"
        target = HERE / f"iou_{run.replace('=', '-')}.json"
        if source.is_file():
            shutil.copyfile(source, target)
        result = json.loads(target.read_text())
        rows = result["epochs"]
        xs = [r["epoch"] for r in rows]
        mapping = result["mappings"]["teacher~student"]
        axes[0].plot(xs, [r["similar/teacher~student"] for r in rows], marker="o", label=f"{label} ({mapping})")
        axes[1].plot(xs, [r["discrepant/teacher~student"] for r in rows], marker="o", label=label)
        axes[2].plot(xs, [r["cam/student"] for r in rows], marker="o", label=label)
    whole = rows[0]["whole image"]
    for ax, title in zip(axes, ("similar region (A_co ≥ 1) ∩ object", "discrepant region (A_di > 1) ∩ object",
                                "student CAM region ∩ object")):
        ax.axhline(whole, color="gray", lw=1, ls="--", label="whole image (reference)")
        ax.set(xlabel="epoch", title=title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"IoU with the object (%), {result['images']} validation images")
    axes[0].legend(fontsize="small")
    axes[2].legend(fontsize="small")
    fig.suptitle("Embedded dataset, WRN-16-2 (T) → ResNet-8 (S), seed 0: where do teacher and student agree?")
    fig.savefig(HERE / "fig2_iou.png", dpi=110)


if __name__ == "__main__":
    main()
