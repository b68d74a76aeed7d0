"""What Cog reads from predict.py without running it: literal inputs and the OpenAPI schema.

    .venv/bin/python -m pytest tests/test_schema.py

cog 0.23 builds the schema by parsing predict.py statically, and the local server validates
with .cog/openapi_schema.json; script/schema writes both from TrainConfig. These tests fail when
either is stale, and when predict.py uses an expression the static parser cannot read.
"""

import ast
import importlib.machinery
import importlib.util
import json
import subprocess
import sys

import pytest

from helpers import ROOT

PREDICT = ROOT / "predict.py"
SCHEMA = ROOT / ".cog" / "openapi_schema.json"


@pytest.fixture(scope="module")
def schema_script():
    """script/schema (a file without .py) loaded as a module."""
    loader = importlib.machinery.SourceFileLoader("schema_script", str(ROOT / "script" / "schema"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def test_schema_check_passes_on_the_committed_files():
    """The command a developer runs; its message says what to do when it fails."""
    result = subprocess.run([sys.executable, str(ROOT / "script" / "schema"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["predict", "generate"])
def test_each_committed_schema_is_what_its_predictor_gives(schema_script, name):
    predictor = schema_script.PREDICTORS[name]
    assert json.loads(predictor.schema.read_text()) == schema_script.openapi_schema(predictor)


def test_predict_py_inputs_are_what_train_config_gives(schema_script):
    source = PREDICT.read_text()
    assert schema_script.predict_source(source) == source
    # ...and a drifted value is caught: the generator puts TrainConfig's back.
    drifted = source.replace("default=50, ge=0, le=10000,", "default=51, ge=0, le=10000,", 1)
    assert drifted != source and schema_script.predict_source(drifted) == source


def test_the_schema_describes_every_input_with_its_rules():
    from train.config import fields

    schemas = json.loads(SCHEMA.read_text())["components"]["schemas"]
    properties = schemas["Input"]["properties"]
    assert set(properties) == {f.name for f in fields() if f.metadata["cog"]}
    assert schemas["Input"]["required"] == ["instance_prompt", "instance_data"]
    assert properties["instance_data"]["format"] == "uri"
    resolution = properties["resolution"]
    # Unset until the base model's family gives its own (families.settle): no default here.
    assert (resolution["type"], resolution["nullable"], resolution["minimum"],
            resolution["maximum"]) == ("integer", True, 64, 2048)
    assert "default" not in resolution and "1024 for SDXL" in resolution["description"]
    [ref] = properties["lr_scheduler"]["allOf"]
    choices = schemas[ref["$ref"].rsplit("/", 1)[1]]["enum"]
    assert "cosine" in choices and properties["lr_scheduler"]["default"] == "constant"
    assert schemas["Output"] == {"title": "Output", "type": "string", "format": "uri"}


def test_generate_py_inputs_are_what_generate_config_gives(schema_script):
    from train.config import fields
    from train.generate import GenerateConfig

    predictor = schema_script.PREDICTORS["generate"]
    source = predictor.file.read_text()
    assert schema_script.predict_source(source, predictor) == source
    drifted = source.replace("default=25, ge=1, le=500,", "default=26, ge=1, le=500,", 1)
    assert drifted != source and schema_script.predict_source(drifted, predictor) == source
    schemas = json.loads(predictor.schema.read_text())["components"]["schemas"]
    properties = schemas["Input"]["properties"]
    assert set(properties) == {f.name for f in fields(GenerateConfig) if f.metadata["cog"]}
    assert schemas["Input"]["required"] == ["prompt"]
    assert properties["weights"]["format"] == "uri" and properties["seed"]["nullable"]
    assert schemas["Output"] == {"title": "Output", "type": "array",
                                 "items": {"type": "string", "format": "uri"}}


def predict_parameters(path=PREDICT):
    tree = ast.parse(path.read_text())
    predict = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                   and n.name == "predict")
    args = predict.args.args[1:]
    return list(zip(args, predict.args.defaults[-len(args):]))


@pytest.mark.parametrize("path", [PREDICT, ROOT / "generate.py"], ids=lambda p: p.name)
def test_inputs_are_literals_that_a_static_parser_reads(path):
    """The rules of cog's tree-sitter parser (pkg/schema/python/parser.go): the default of each
    parameter is an Input(...) call; default and choices are literals; ge and le are number
    literals (anything else is dropped without a word); a description is one plain string
    literal (the parser cuts the quotes off the source text and keeps the rest, so escapes and
    implicit concatenation would reach the schema as written)."""
    source = path.read_text()
    for arg, default in predict_parameters(path):
        name = arg.arg
        assert isinstance(default, ast.Call) and getattr(default.func, "id", "") == "Input", name
        assert not default.args, f"{name}: Input() takes keywords only here"
        for keyword in default.keywords:
            value = keyword.value
            ast.literal_eval(value)  # raises on anything but a literal
            if keyword.arg in ("ge", "le"):
                assert isinstance(value, ast.Constant) and type(value.value) in (int, float), name
            if keyword.arg == "description":
                text = ast.get_source_segment(source, value)
                assert text == f'"{value.value}"', f"{name}: description must be one plain literal"
        assert arg.annotation is not None, f"{name}: needs a type annotation"
