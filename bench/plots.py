"""What every figure script shares: how a figure is saved (the resolution, the layout, the folder made)."""
import io

import matplotlib.pyplot as plt
from PIL import Image

DPI = 150


def save(fig, path, **layout):
    """`fig` as a PNG at DPI, its colours reduced to a 256-colour palette: a plot's flat colours and their
    anti-aliased edges survive, and the file is 2-3 times smaller, so a README's figures stay light."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(**layout)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI)
    plt.close(fig)
    Image.open(buf).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
