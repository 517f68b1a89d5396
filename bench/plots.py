"""What every figure script shares: how a figure is saved (the resolution, the layout, the folder made)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DPI = 80


def save(fig, path, **layout):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(**layout)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
