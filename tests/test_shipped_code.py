"""The demo checkpoint ships copies of the package modules (they load with `trust_remote_code`): they must equal the
package byte for byte, and every sibling module a shipped module imports must be shipped next to it."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "modeling_monoformer"
DEMO = ROOT / "examples" / "monoformer-fashion-mnist"
SHIPPED = sorted(DEMO.rglob("*.py"))


def test_the_demo_ships_the_model_processor_and_pipeline_code():
    names = {p.relative_to(DEMO).as_posix() for p in SHIPPED}
    assert {"model/modeling_monoformer.py", "model/configuration_monoformer.py", "pipeline_monoformer.py",
            "processor/processing_monoformer.py", "processor/image_processing_monoformer.py"} <= names


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda p: p.relative_to(DEMO).as_posix())
def test_shipped_code_equals_the_package_byte_for_byte(shipped):
    source = PACKAGE / shipped.name
    assert source.is_file(), f"{shipped} has no package module {source.name}"
    assert shipped.read_bytes() == source.read_bytes(), (
        f"{shipped.relative_to(ROOT)} differs from {source.relative_to(ROOT)}: `cp {source.relative_to(ROOT)} "
        f"{shipped.relative_to(ROOT)}` in the commit that changed the package module."
    )


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda p: p.relative_to(DEMO).as_posix())
def test_every_sibling_import_of_shipped_code_is_shipped_next_to_it(shipped):
    siblings = re.findall(r"^\s*from \.(\w+) import", shipped.read_text(), flags=re.M)
    missing = [name for name in siblings if not (shipped.parent / f"{name}.py").is_file()]
    assert not missing, f"{shipped.relative_to(ROOT)} imports {missing}, which are not shipped next to it"
