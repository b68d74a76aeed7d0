"""The generator: the trainer's tarball served as a model that draws the subject
(train/generate.py, train/trained.py, generate.py), through the library, the command line and the
real Cog server started with script/serve, with its weights served over loopback HTTP.

    .venv/bin/python -m pytest tests/test_generate.py --durations=10

One tiny LoRA training, exported in every format, gives a tarball per format (each with its
training.json, as a user who asked for that format gets): the images each draws are compared
with one another and with the base model's.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ROOT, train_tiny
from serving import Loopback, Server, call, data_uri, wait_for
from train.errors import UserError
from train.generate import GenerateConfig, Generator, draw
from train.trained import make_room

SETTINGS = dict(prompt="a photo of sks ball", width=64, height=64, num_inference_steps=3,
                seed=7, num_outputs=2)
PARTS = {"diffusers": ["model_index.json", "unet", "vae", "text_encoder", "tokenizer",
                       "scheduler"],
         "single_file": ["model.safetensors"], "lora": ["lora", "lora.safetensors"]}


def tar_of(folder: Path, names: list[str], path: Path, extra: dict | None = None,
           mode: str = "w") -> Path:
    """A tarball of `names` from `folder`, plus `extra` members (name -> bytes or TarInfo)."""
    with tarfile.open(path, mode) as tar:
        for name in names:
            tar.add(folder / name, arcname=name)
        for name, payload in (extra or {}).items():
            if isinstance(payload, tarfile.TarInfo):
                tar.addfile(payload)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, photos):
    """(the untarred output, {format: tarball}) of one LoRA run exported in every format."""
    tmp = tmp_path_factory.mktemp("trained")
    folder, _ = train_tiny(tmp, photos, with_prior_preservation=False, use_lora=True,
                           output_format="diffusers,single_file,lora", max_train_steps=5,
                           learning_rate=1e-2)
    return folder, {fmt: tar_of(folder, ["training.json", *names], tmp / f"{fmt}.tar")
                    for fmt, names in PARTS.items()}


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float64) for image in images])


def difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference, in 8-bit levels."""
    return float(np.abs(a - b).mean())


@pytest.fixture(scope="module")
def base_images():
    """What the base model draws with SETTINGS."""
    from train.models import load_pipeline

    return pixels(draw(load_pipeline("tiny", "cpu"), GenerateConfig(**SETTINGS),
                       log=lambda line: None))


def test_every_format_the_trainer_writes_draws_the_trained_subject(trained, base_images,
                                                                   tmp_path):
    _, tarballs = trained
    generator = Generator("tiny", "cpu", tmp_path, 1 << 30, log=lambda line: None)
    config = GenerateConfig(**SETTINGS)
    drawn = {}
    for fmt, tarball in tarballs.items():
        folder = generator.unpacked(fmt, tarball, "weights", tarball.name)
        drawn[fmt] = pixels(draw(generator.pipeline(fmt, folder, "weights", tarball.name),
                                 config, log=lambda line: None))
    # Measured: the single file draws exactly what the diffusers folder does (the same fp16
    # weights), the unmerged fp16 LoRA on the fp32 base 0.02 levels off; the base 12 levels off.
    assert difference(drawn["diffusers"], drawn["single_file"]) < 0.1
    assert difference(drawn["diffusers"], drawn["lora"]) < 1
    assert difference(drawn["diffusers"], base_images) > 5
    # The LoRA's strength is set per prediction, on the weights already loaded: 0 is the base.
    folder = tmp_path / "cache" / "lora"
    at_zero = draw(generator.pipeline("lora", folder, "weights", "lora.tar", lora_scale=0.0),
                   config, log=lambda line: None)
    assert np.array_equal(pixels(at_zero), base_images)
    half = draw(generator.pipeline("lora", folder, "weights", "lora.tar", lora_scale=0.5),
                config, log=lambda line: None)
    assert 1 < difference(pixels(half), base_images) < difference(drawn["lora"], base_images)
    # A single file on a built-in base takes its configs from the built-in, written out once.
    assert (tmp_path / "configs" / "model_index.json").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_every_format_draws_in_half_precision(trained, base_images, tmp_path):
    _, tarballs = trained
    generator = Generator("tiny", "cuda", tmp_path, 1 << 30, log=lambda line: None)
    for fmt, tarball in tarballs.items():
        folder = generator.unpacked(fmt, tarball, "weights", tarball.name)
        pipe = generator.pipeline(fmt, folder, "weights", tarball.name)
        assert pipe.unet.dtype in (torch.bfloat16, torch.float16)
        drawn = pixels(draw(pipe, GenerateConfig(**SETTINGS), log=lambda line: None))
        # Half precision draws the fp32 picture up to rounding, far from the base model's.
        assert drawn.std() > 1 and difference(drawn, base_images) > 5, fmt


def test_the_cache_removes_the_least_recently_used_to_stay_in_its_bound(tmp_path):
    for age, key in enumerate(["old", "used", "new"]):
        (tmp_path / key).mkdir()
        (tmp_path / key / "w.safetensors").write_bytes(bytes(1000))
        stamp = 1_000_000 + age
        os.utime(tmp_path / key, (stamp, stamp))
    assert make_room(tmp_path, 3000, 1000, keep={"used"}) == ["old"]
    assert make_room(tmp_path, 1000, 1000, keep={"used"}) == ["new"]  # "used" stays, whatever
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]


def hostile(name: str, folder: Path, tmp: Path) -> Path:
    """A tarball that is wrong, broken or hostile in the way `name` says."""
    full = ["training.json", *PARTS["diffusers"]]
    path = tmp / f"{name.replace(' ', '-')}.tar"
    if name == "not a tarball":
        path.write_bytes(b"PK\x03\x04 not a tarball at all" * 40)
        return path
    if name == "a path outside":
        return tar_of(folder, full, path, {"../../evil.json": b"{}"})
    if name == "a link":
        link = tarfile.TarInfo("unet/escape")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        return tar_of(folder, full, path, {"unet/escape": link})
    if name == "a pickle":
        return tar_of(folder, full, path, {"unet/diffusion_pytorch_model.bin": b"\x80\x04N."})
    if name == "no training.json":
        return tar_of(folder, PARTS["diffusers"], path)
    if name == "a part missing":
        return tar_of(folder, [n for n in full if n != "unet"], path)
    if name == "damaged weights":
        junk = {"unet/diffusion_pytorch_model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}"}
        return tar_of(folder, [n for n in full if n != "unet"] + ["unet/config.json"], path,
                      junk)
    if name == "a bomb":
        return tar_of(folder, ["training.json"], path, {"zeros": bytes(64 << 20)}, mode="w:gz")
    if name == "a file and a folder":
        return tar_of(folder, full, path, {"lora": b"", "lora/x.safetensors": b""})
    if name == "a pickled shard":  # loaders read whatever a shard index names: a pickle too
        index = {"metadata": {}, "weight_map": {"conv_in.weight": "shard.dat"}}
        return tar_of(folder, full, path, {
            "unet/diffusion_pytorch_model.safetensors.index.json": json.dumps(index).encode(),
            "unet/shard.dat": b"\x80\x04N."})
    if name == "a forged training.json":
        record = json.loads((folder / "training.json").read_text())
        record["family"] = ["sd1"]
        return tar_of(folder, PARTS["diffusers"], path,
                      {"training.json": json.dumps(record).encode()})
    raise ValueError(name)


HOSTILE = {
    "not a tarball": "weights: not-a-tarball.tar is not a tarball",
    "a path outside": "holds a path outside its folder ('../../evil.json')",
    "a link": "holds a link ('unet/escape')",
    "a pickle": "holds a pickle, which is not loaded here (unpickling can run code)",
    "no training.json": "is not a tarball the trainer wrote",
    "a part missing": "has no unet/",
    "damaged weights": "weights: damaged-weights.tar could not be loaded",
    "a bomb": "weights: a-bomb.tar expands past 1 MiB; send the tarball the trainer returned",
    "a file and a folder": "holds 'lora' both as a file and as a folder",
    "a pickled shard": "holds a weight index ('unet/diffusion_pytorch_model.safetensors.index"
                       ".json') that names files other than .safetensors",
    "a forged training.json": "weights: the training.json of a-forged-training.json.tar is not "
                              "the trainer's",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_wrong_or_hostile_tarball_is_one_line_naming_it(trained, tmp_path, name):
    folder, _ = trained
    tarball = hostile(name, folder, tmp_path)
    work = tmp_path / "server"
    generator = Generator("tiny", "cpu", work, 1 << 30, log=lambda line: None)
    with pytest.raises(UserError) as error:
        unpacked = generator.unpacked("key", tarball, "weights", tarball.name)
        generator.pipeline("key", unpacked, "weights", tarball.name)
    message = str(error.value)
    assert HOSTILE[name] in message and "\n" not in message, message
    assert str(work) not in message, message  # the server's folders are not the client's
    # Nothing stays in the cache: not half an unpacked tarball, nor one that failed to load.
    assert not (work / "cache").exists() or not list((work / "cache").iterdir())


@pytest.mark.parametrize("fmt, base, message", [
    ("lora", "tiny-sd2", "weights: lora.tar is a LoRA for SD 1.x, and this server's base model "
                         "is SD 2.x"),
    ("lora", "toy", "weights: lora.tar is a LoRA trained on 'tiny', and this server's base "
                    "model is 'toy'"),
    ("single_file", "tiny-sd2", "weights: single_file.tar holds an SD 1.x single file, and "
                                "this server's base model, whose configs it needs, is SD 2.x"),
])
def test_weights_for_another_base_model_are_refused(trained, tmp_path, fmt, base, message):
    _, tarballs = trained
    generator = Generator(base, "cpu", tmp_path, 1 << 30, log=lambda line: None)
    name = tarballs[fmt].name
    folder = generator.unpacked(fmt, tarballs[fmt], "weights", name)
    with pytest.raises(UserError) as error:
        generator.pipeline(fmt, folder, "weights", name)
    assert str(error.value).startswith(message), error.value


def test_a_tarball_of_the_untarred_folder_loads_and_only_that_folder(trained, tmp_path):
    """Users re-tar the folder they untarred (`tar cf dog.tar dog/`): one level down is fine,
    and what lies beside the folder is not unpacked."""
    folder, _ = trained
    tarball = tmp_path / "dog.tar"
    with tarfile.open(tarball, "w") as tar:
        for name in ["training.json", *PARTS["lora"]]:
            tar.add(folder / name, arcname=f"dog/{name}")
        tar.add(folder / "training.json", arcname="elsewhere.json")
    generator = Generator("tiny", "cpu", tmp_path / "server", 1 << 30, log=lambda line: None)
    unpacked = generator.unpacked("dog", tarball, "weights", "dog.tar")
    assert sorted(p.name for p in unpacked.iterdir()) == ["lora", "lora.safetensors",
                                                          "training.json"]
    assert generator.pipeline("dog", unpacked, "weights", "dog.tar") is generator.base_pipe


def test_the_command_line_writes_pngs_and_answers_mistakes_in_one_line(trained, tmp_path,
                                                                       venv_env):
    _, tarballs = trained
    command = [sys.executable, "-m", "train.generate", "--weights", str(tarballs["lora"]),
               "--model", "tiny", "--prompt", "a photo of sks ball", "--width", "64",
               "--height", "48", "--num-inference-steps", "2", "--num-outputs", "2",
               "--seed", "3", "--output", str(tmp_path / "images")]
    done = subprocess.run(command, capture_output=True, text=True, env=venv_env, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for i in range(2):
        with Image.open(tmp_path / "images" / f"image-00{i}.png") as image:
            assert image.size == (64, 48)
    assert "seed 3" in done.stdout and done.stderr == "", done.stderr  # a quiet terminal
    wrong = subprocess.run(command[:-2] + ["--width", "60"], capture_output=True, text=True,
                           env=venv_env, timeout=300, cwd=tmp_path)
    assert (wrong.returncode, wrong.stderr) == (
        2, "error: width must be a multiple of 8 (got 60); try 56\n")


# --- The Cog generator over HTTP ---------------------------------------------------------------

PREDICTION = dict(SETTINGS)


def ask(server: Server, inputs: dict) -> dict:
    """One prediction, once the server is READY: Cog frees its slot just after it answers the
    previous one. Returns the prediction."""
    wait_for(server.ready, 30, "the server to be READY")
    status, result = server.predict(inputs)
    assert status == 200, result
    return result


def images_of(result: dict) -> np.ndarray:
    """The PNGs a prediction returned (inlined as data: URIs), as pixels."""
    images = []
    for output in result["output"]:
        header, payload = output.split(",", 1)
        assert header == "data:image/png;base64", header
        images.append(Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB"))
    return pixels(images)


@pytest.fixture(scope="module")
def loopback(tmp_path_factory, trained):
    """Serves the trainer's tarballs (GET /files/NAME) and the hostile ones."""
    server = Loopback(tmp_path_factory.mktemp("loopback"))
    folder, tarballs = trained
    for tarball in tarballs.values():
        (server.folder / tarball.name).write_bytes(tarball.read_bytes())
    for name in ("not a tarball", "a path outside", "a pickle", "a part missing"):
        hostile(name, folder, server.folder)
    yield server
    server.close()


SERVE = str(ROOT / "script" / "serve")


@pytest.fixture(scope="module")
def published(tmp_path_factory, loopback, photos):
    """Replicate's trainings call, played here: the trainer on Cog's training API as
    generate.yaml's image serves it (script/serve train) trains on the photos; its tarball is
    stored where the generator fetches it from, as Replicate stores a training's output. Returns
    its URL: what Replicate makes the new version's COG_WEIGHTS."""
    scratch = tmp_path_factory.mktemp("trainer-tmp")
    # Cog's server inlines a training's weights as a data: URI (it sends outputs nested in an
    # object, as TrainingOutput's are, to no --upload-url), so this test stores them itself.
    server = Server(scratch, scratch.parent / "trainer.log", command=[SERVE, "train"])
    try:
        wait_for(server.ready, 30, "the trainer to be READY")
        status, result = call("POST", server.base + "/trainings", {"input": dict(
            instance_prompt="a photo of sks ball", instance_data=data_uri(photos),
            with_prior_preservation=False, resolution=64, max_train_steps=4,
            learning_rate=1e-3)})
    finally:
        server.stop()
    assert status == 200 and result["status"] == "succeeded", result
    header, payload = result["output"]["weights"].split(",", 1)
    assert header == "data:application/x-tar;base64"
    (loopback.folder / "published.tar").write_bytes(base64.b64decode(payload))
    return f"{loopback.url}/files/published.tar"


@pytest.fixture(scope="module")
def generator(tmp_path_factory, published):
    """The generator's Cog server as script/serve starts it, its own weights (COG_WEIGHTS) the
    published tarball, fetched and loaded in setup."""
    scratch = tmp_path_factory.mktemp("generator-tmp")
    server = Server(scratch, scratch.parent / "generator.log", command=[SERVE, "generate"],
                    env=dict(COG_WEIGHTS=published))
    yield server
    server.stop()


def test_the_generator_serves_its_committed_schema(generator):
    status, schema = call("GET", generator.base + "/openapi.json")
    assert status == 200
    assert schema == json.loads((ROOT / ".cog" / "generate_schema.json").read_text())
    status, body = generator.predict(dict(PREDICTION, width=4096))
    assert status == 422 and "4096 is greater than the maximum of 2048" in str(body), body


def test_trained_published_and_generated_its_own_weights_fetched_once(generator, loopback,
                                                                     published, base_images):
    results = [ask(generator, PREDICTION) for _ in range(2)]
    assert [r["status"] for r in results] == ["succeeded"] * 2, results
    first, second = (images_of(r) for r in results)
    assert first.shape == (2, 64, 64, 3) and np.array_equal(first, second)  # seeded
    assert difference(first, base_images) > 5  # the trained weights, not the base model
    path = published.removeprefix(loopback.url)
    assert loopback.requests.count(path) == 1  # in setup, and never again


def test_weights_sent_with_a_prediction_are_fetched_once_and_scaled(generator, loopback,
                                                                    base_images):
    url = f"{loopback.url}/files/lora.tar"
    full = ask(generator, dict(PREDICTION, weights=url))
    zero = ask(generator, dict(PREDICTION, weights=url, lora_scale=0))
    assert (full["status"], zero["status"]) == ("succeeded", "succeeded"), (full, zero)
    assert difference(images_of(full), base_images) > 5
    # The server runs torch on one thread, this process on two: equal up to rounding.
    assert difference(images_of(zero), base_images) < 0.1
    assert loopback.requests.count("/files/lora.tar") == 1
    assert "is in the cache" in zero["logs"]


@pytest.mark.parametrize("weights, message", [
    ("/files/not-a-tarball.tar", "weights: not-a-tarball.tar is not a tarball"),
    ("/files/a-path-outside.tar", "holds a path outside its folder"),
    ("/files/a-pickle.tar", "holds a pickle, which is not loaded here"),
    ("/files/a-part-missing.tar", "has no unet/"),
    ("/files/nothing-here.tar", "weights: 127.0.0.1 answered 404 Not Found"),
    ("/etc/passwd", "weights: send the file itself, as an http(s) URL or a data: URI"),
])
def test_bad_weights_fail_in_one_line_and_the_next_prediction_succeeds(generator, loopback,
                                                                       weights, message):
    url = loopback.url + weights if weights.startswith("/files/") else weights
    result = ask(generator, dict(PREDICTION, weights=url))
    assert result["status"] == "failed", result
    assert message in result["error"] and "\n" not in result["error"], result["error"]
    assert "Traceback" not in result["logs"], result["logs"]
    assert ask(generator, PREDICTION)["status"] == "succeeded"


def test_broken_own_weights_are_said_and_the_server_stays_up(tmp_path, loopback):
    server = Server(tmp_path, tmp_path / "server.log", command=[SERVE, "generate"],
                    env=dict(COG_WEIGHTS=f"{loopback.url}/files/not-a-tarball.tar"))
    try:
        result = ask(server, PREDICTION)
        assert result["status"] == "failed", result
        assert result["error"].endswith(
            "COG_WEIGHTS: not-a-tarball.tar is not a tarball; send the tarball the trainer "
            "returned (a .tar)"), result["error"]
        weights = f"{loopback.url}/files/single_file.tar"
        assert ask(server, dict(PREDICTION, weights=weights))["status"] == "succeeded"
    finally:
        server.stop()
    assert "setup: COG_WEIGHTS: not-a-tarball.tar is not a tarball" in \
        (tmp_path / "server.log").read_text()
