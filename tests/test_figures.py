"""The READMEs' figures: every image a README links exists, and bench/figures.py makes every one of them."""
import re

from conftest import ROOT

LINK = re.compile(r"!\[[^\]]*\]\(([^)]+\.png)\)")


def linked_images():
    """(README, image path relative to the repository) of every image a README embeds."""
    return [(readme, (readme.parent / target).resolve().relative_to(ROOT))
            for readme in sorted(ROOT.glob("**/README.md")) if ".venv" not in readme.parts
            for target in LINK.findall(readme.read_text())]


def test_every_chapter_readme_and_the_top_one_show_a_figure_that_exists():
    images = linked_images()
    assert {readme.parent.name for readme, _ in images} >= {ROOT.name, "01_single_core", "02_tensor_parallel",
                                                            "03_data_parallel", "04_zero", "05_pipeline", "06_3d"}
    missing = [f"{readme.relative_to(ROOT)} -> {image}" for readme, image in images if not (ROOT / image).exists()]
    assert not missing, missing
    too_big = [str(image) for _, image in images if (ROOT / image).stat().st_size > 150 * 1024]
    assert not too_big, too_big


def test_the_figure_script_makes_every_image_the_readmes_show(figures):
    made = {path.relative_to(figures) for path in figures.glob("**/figures/*.png")}
    assert {image for _, image in linked_images()} <= made, made
