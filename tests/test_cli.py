"""The `dmin` command: a training script's own arguments, one-line errors with exit code 2 (130 for Ctrl-C) for
every failure, the page's server settings, and every error class the library raises exported."""

import argparse
import errno
import importlib
import inspect
import json
import pkgutil
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import get_peft_model_state_dict

import dmin_diffusers as dm
import dmin_diffusers.cli as cli
from dmin_diffusers.cli import build_parser, main
from dmin_diffusers.store import record_files
from tiny_models import add_lora, make_caption_dataset, make_image_dataset, tiny_pipeline

NUM_ROWS = 3
SETTINGS = ["--num_timesteps", "2", "--projection_dim", "256", "--shard_size", "1", "--resolution", "32"]
#: a sample of each kind of training-only argument of diffusers' scripts: values, flags, lists
SCRIPT_ARGUMENTS = ["--train_batch_size", "4", "--max_train_steps", "10", "--learning_rate", "1e-4", "--rank", "4",
                    "--use_8bit_adam", "--validation_prompts", "a red circle", "a blue square",
                    "--gradient_checkpointing", "--lr_scheduler", "constant", "--report_to", "tensorboard"]


def write_imagefolder(folder: Path, num_rows: int = NUM_ROWS) -> Path:
    folder.mkdir(parents=True)
    dataset = make_caption_dataset(num_rows)
    with open(folder / "metadata.jsonl", "w") as handle:
        for row in range(num_rows):
            dataset[row]["image"].save(folder / f"row_{row:03d}.png")
            handle.write(json.dumps({"file_name": f"row_{row:03d}.png", "text": dataset[row]["text"]}) + "\n")
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """What a LoRA training run leaves on disk: the base pipeline, the run's output_dir with its LoRA, and the
    imagefolder it trained on."""
    root = tmp_path_factory.mktemp("run")
    base = tiny_pipeline("stable-diffusion", tokenizer_dir=root / "tokenizer")
    base.save_pretrained(root / "base")
    add_lora(base.unet, rank=4, seed=3)
    StableDiffusionPipeline.save_lora_weights(root / "output", unet_lora_layers=get_peft_model_state_dict(base.unet))
    return {"base": root / "base", "output": root / "output", "data": write_imagefolder(root / "data")}


def cache_arguments(run, *extra):
    return ["cache", "--pretrained_model_name_or_path", str(run["base"]), "--lora_weights", str(run["output"]),
            "--train_data_dir", str(run["data"]), *SETTINGS, *extra]


def one_error_line(capsys, command: str) -> str:
    """The error line of a failed command: its last line on stderr (before it, only the progress bars of the
    libraries), the only one saying ``dmin <command>:``, and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dmin ")]
    assert len(lines) == 1 and lines[0].startswith(f"dmin {command}: "), err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == lines[0], err
    return lines[0]


def rows_of(directory):
    index = dm.AttributionIndex.from_pretrained(directory)
    return index.store.get_rows(list(range(index.num_rows)))


# ------------------------------------------------------------------------- a training script's own arguments


def test_the_training_scripts_own_arguments_cache_where_the_callback_does(run, tmp_path, capsys, caplog):
    """`accelerate launch -m dmin_diffusers.cli cache` with the arguments of train_text_to_image_lora.py: the
    training-only ones are listed and ignored, the LoRA is the one in --output_dir and the index goes to
    <output_dir>/dmin-index, where GradientCacheCallback puts it; after a training re-run into the same
    --output_dir, the stale index there is replaced, as the callback replaces it."""
    output = shutil.copytree(run["output"], tmp_path / "output")
    arguments = ["cache", "--pretrained_model_name_or_path", str(run["base"]), "--train_data_dir", str(run["data"]),
                 "--output_dir", str(output), "--caption_column", "text", "--center_crop", "--random_flip",
                 "--image_interpolation_mode", "bicubic", *SCRIPT_ARGUMENTS, *SETTINGS]
    with caplog.at_level("INFO", logger="dmin_diffusers"):
        assert main(arguments) == 0
    ignored = next(line for line in caplog.messages if line.startswith("ignored training-only arguments: "))
    assert set(ignored.split(": ")[1].split()) == {
        "--train_batch_size", "--max_train_steps", "--learning_rate", "--rank", "--use_8bit_adam",
        "--validation_prompts", "--gradient_checkpointing", "--lr_scheduler", "--report_to"}
    index = dm.AttributionIndex.from_pretrained(output / "dmin-index")
    assert index.num_rows == NUM_ROWS and index.config.image_interpolation_mode == "bicubic"
    assert index.config.parameters and all(".lora_" in name for name, _ in index.config.parameters)  # the run's LoRA
    assert index.config.adapter == str(output)
    attribute = ["attribute", "--pretrained_model_name_or_path", str(run["base"]), "--lora_weights", str(output),
                 "--index", str(output / "dmin-index"), "--image", str(run["data"] / "row_002.png"), "--prompt",
                 make_caption_dataset(NUM_ROWS)[2]["text"], "--top_k", "1"]
    assert main(attribute) == 0
    assert json.loads(capsys.readouterr().out)["row"] == 2

    retrained = tiny_pipeline("stable-diffusion", tokenizer_dir=tmp_path / "tokenizer")  # a re-run, other weights
    add_lora(retrained.unet, rank=4, seed=4)
    StableDiffusionPipeline.save_lora_weights(output, unet_lora_layers=get_peft_model_state_dict(retrained.unet))
    assert main(arguments) == 0
    replaced = dm.AttributionIndex.from_pretrained(output / "dmin-index")
    assert replaced.config.parameter_fingerprint != index.config.parameter_fingerprint
    assert main(attribute) == 0  # the index describes the new weights


def parse_cache(*extra):
    return build_parser().parse_args(["cache", "--output_dir", "out", *extra])


def test_script_arguments_take_exactly_their_values_and_typos_stay_errors(capsys):
    parsed = parse_cache("--use_ema", "--resolution", "32", "--validation_prompts", "a", "b", "--seed", "7",
                         "--rank", "8", "--center_crop")
    assert (parsed.resolution, parsed.seed, parsed.center_crop) == (32, 7, True)  # a flag swallowed nothing
    assert parsed.validation_prompts == ["a", "b"] and parsed.rank == "8"
    assert cli.ignored_training_arguments(parsed) == ["--rank", "--use_ema", "--validation_prompts"]
    assert cli.ignored_training_arguments(parse_cache()) == []  # nothing listed that was not given
    for extra, message in [
        (["--learning_rat", "1e-4"], "unrecognized arguments: --learning_rat"),
        (["--max_train_step", "10"], "unrecognized arguments: --max_train_step"),  # no prefix matching
        (["--use_ema", "yes"], "unrecognized arguments: yes"),  # a flag takes no value
        (["--rank", "4", "8"], "unrecognized arguments: 8"),  # an option takes exactly its value
        (["--rank"], "expected one argument"),
    ]:
        with pytest.raises(SystemExit) as raised:
            parse_cache(*extra)
        assert raised.value.code == 2
        assert message in capsys.readouterr().err, extra


def test_the_list_of_script_arguments_is_consistent():
    own = {option for action in build_parser()._subparsers._group_actions[0].choices["cache"]._actions
           for option in action.option_strings if action.help != argparse.SUPPRESS}
    script_only = set(cli.TRAINING_ONLY_ARGUMENTS) | set(cli.UNSUPPORTED_ARGUMENTS)
    assert not own & script_only  # an argument the cache uses is never also ignored
    for name, nargs in cli.TRAINING_ONLY_ARGUMENTS.items():  # each takes what its nargs says, and is listed
        values = {0: [], None: ["1"], "+": ["1", "2"]}[nargs]
        assert cli.ignored_training_arguments(parse_cache(name, *values)) == [name]


def test_the_model_of_a_training_run_is_found_in_its_output_dir(tmp_path):
    def resolved(output_dir, **given):
        args = parse_cache(*[item for key, value in given.items() for item in (f"--{key}", value)])
        args.output_dir = str(output_dir)
        cli.resolve_training_run(args)
        return args

    output = tmp_path / "lora-run"
    output.mkdir()
    (output / cli.LORA_WEIGHTS_NAME).write_bytes(b"")
    args = resolved(output, pretrained_model_name_or_path="user/base")
    assert (args.lora_weights, args.index_dir, args.replace_stale) == (str(output), str(output / "dmin-index"), True)
    args = resolved(output, pretrained_model_name_or_path="user/base", lora_weights="user/lora", index_dir="elsewhere")
    assert (args.lora_weights, args.index_dir) == ("user/lora", "elsewhere")  # explicit arguments win
    assert not args.replace_stale  # an index named on the command line is resumed, never replaced
    args = resolved(tmp_path / "not-a-run", pretrained_model_name_or_path="user/base")
    assert args.index_dir == str(tmp_path / "not-a-run" / "dmin-index") and not args.replace_stale

    full = tmp_path / "full-run"  # train_text_to_image.py and train_unconditional.py save the whole pipeline
    full.mkdir()
    (full / "model_index.json").write_text("{}")
    args = resolved(full, pretrained_model_name_or_path="user/base")
    assert (args.pretrained_model_name_or_path, args.lora_weights) == (str(full), None)
    assert resolved(full).pretrained_model_name_or_path == str(full)  # train_unconditional.py has no base model

    unfinished = tmp_path / "unfinished-run"
    (unfinished / "checkpoint-500").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has checkpoints but no final pytorch_lora_weights.safetensors"):
        resolved(unfinished, pretrained_model_name_or_path="user/base")
    with pytest.raises(ValueError, match="give --pretrained_model_name_or_path"):
        resolved(tmp_path / "nothing-there")
    args = parse_cache()
    args.output_dir = None
    with pytest.raises(ValueError, match="give --output_dir"):
        cli.resolve_training_run(args)


@pytest.fixture
def nothing_loaded(monkeypatch):
    """The CLI's loaders replaced by functions that fail: an error seen with them in place came first."""

    def boom(*args, **kwargs):
        raise AssertionError("something was loaded")

    monkeypatch.setattr(cli, "load_pipeline", boom)
    monkeypatch.setattr("dmin_diffusers.training_data.load_training_dataset", boom)


def test_arguments_that_change_the_loss_are_refused(run, capsys, nothing_loaded):
    for extra in (["--tokenizer_max_length", "77"], ["--text_encoder_use_attention_mask"],
                  ["--class_labels_conditioning", "timesteps"], ["--dream_training"], ["--tokenizer_name", "x"]):
        assert main(cache_arguments(run, "--output_dir", "unused", *extra)) == 2
        assert f"error: {extra[0]}: the training run computed its loss" in one_error_line(capsys, "cache")


def test_a_prediction_type_other_than_the_schedulers_is_refused():
    pipeline = argparse.Namespace(scheduler=argparse.Namespace(config={"prediction_type": "epsilon"}))
    cli.check_prediction_type(argparse.Namespace(prediction_type="epsilon"), pipeline)
    cli.check_prediction_type(argparse.Namespace(prediction_type=None), pipeline)
    with pytest.raises(ValueError, match="--prediction_type v_prediction differs from the scheduler's"):
        cli.check_prediction_type(argparse.Namespace(prediction_type="v_prediction"), pipeline)


def test_settings_left_out_are_the_training_scripts_defaults():
    """The scripts resize SD / SDXL images with lanczos to 512 / 1024, SD3 / Flux ones bilinearly to 512 (not the
    transformer's native 1024): pasting a script's arguments without them caches what it trained on."""
    args = parse_cache()
    assert [cli.script_defaults(args, family) for family in ("stable-diffusion", "sdxl", "sd3", "flux", "ddpm")] == [
        {"resolution": 512, "image_interpolation_mode": "lanczos"},
        {"resolution": 1024, "image_interpolation_mode": "lanczos"},
        {"resolution": 512, "image_interpolation_mode": "bilinear"},
        {"resolution": 512, "image_interpolation_mode": "bilinear"},
        {"image_interpolation_mode": "bilinear"},  # train_unconditional.py builds the model at its resolution
    ]
    given = parse_cache("--image_interpolation_mode", "box", "--resolution", "256")
    assert cli.script_defaults(given, "sdxl") == {} and cli.script_defaults(args, "another-family") == {}


def test_a_lora_folder_without_weights_names_the_file_the_scripts_write(tmp_path, capsys, nothing_loaded):
    empty = tmp_path / "sd-lora-output"
    (empty / "logs").mkdir(parents=True)
    for command in (["attribute", "--index", "x", "--image", str(tmp_path)], ["app", "--index", "x"]):
        assert main([command[0], "--pretrained_model_name_or_path", "user/base", "--lora_weights", str(empty),
                     *command[1:]]) == 2
        line = one_error_line(capsys, command[0])
        assert "holds no pytorch_lora_weights.safetensors" in line and ".bin" not in line


def test_a_separate_vae_is_loaded_as_the_pipelines(run, tmp_path):
    vae = tiny_pipeline("stable-diffusion", seed=5, tokenizer_dir=tmp_path / "tokenizer").vae
    vae.save_pretrained(tmp_path / "vae")
    args = build_parser().parse_args(["attribute", "--pretrained_model_name_or_path", str(run["base"]),
                                      "--pretrained_vae_model_name_or_path", str(tmp_path / "vae"), "--index", "x",
                                      "--image", "x", "--device", "cpu"])
    pipeline = cli.load_pipeline(args)
    for name, value in vae.state_dict().items():
        assert torch.equal(pipeline.vae.state_dict()[name], value), name


# ------------------------------------------------------------------------------ every failure is one line


def hold_lock_in_another_process(directory: Path) -> subprocess.Popen:
    from dmin_diffusers.locks import LOCK_NAME

    directory.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from filelock import FileLock
            lock = FileLock({str(directory / LOCK_NAME)!r})
            lock.acquire()
            print("held", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_busy_index_is_one_line(run, tmp_path, capsys):
    holder = hold_lock_in_another_process(tmp_path / "busy")
    try:
        assert main(cache_arguments(run, "--index_dir", str(tmp_path / "busy"))) == 2
    finally:
        holder.communicate("")
    line = one_error_line(capsys, "cache")
    assert "another process is writing the attribution index" in line


def fail_after(monkeypatch, shards: int, error: BaseException) -> None:
    """Makes the store's shard writes fail with ``error`` after ``shards`` of them succeeded."""
    import dmin_diffusers.store as store

    real, calls = store.save_file, []

    def save_file(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > shards:
            raise error
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(store, "save_file", save_file)


@pytest.fixture(scope="module")
def uninterrupted(run, tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted") / "index"
    assert main(cache_arguments(run, "--index_dir", str(directory))) == 0
    return directory


@pytest.mark.parametrize("fault", ["disk full", "ctrl-c"])
def test_a_full_disk_or_ctrl_c_is_one_line_and_a_rerun_resumes(fault, run, uninterrupted, tmp_path, capsys, caplog,
                                                                 monkeypatch):
    output = tmp_path / "index"
    error = (OSError(errno.ENOSPC, "No space left on device", str(output / "vectors" / "x.tmp"))
             if fault == "disk full" else KeyboardInterrupt())
    capsys.readouterr()
    with monkeypatch.context() as patch:
        fail_after(patch, 1, error)
        code = main(cache_arguments(run, "--index_dir", str(output)))
    line = one_error_line(capsys, "cache")
    if fault == "disk full":
        assert code == 2
        assert f"no space left on device writing {output}" in line and "finished rows are kept" in line
    else:
        assert code == 130 and line == "dmin cache: interrupted; the finished rows are kept: run the same command " \
                                       "again to resume"
    with caplog.at_level("INFO", logger="dmin_diffusers"):
        assert main(cache_arguments(run, "--index_dir", str(output))) == 0
    assert f"({NUM_ROWS - 1} computed" in caplog.text  # the finished row was kept
    # another pipeline instance than the uninterrupted run's: equal up to float rounding
    torch.testing.assert_close(rows_of(output), rows_of(uninterrupted), rtol=2e-3, atol=1e-5)


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    pipe = tiny_pipeline("ddpm", pipeline_class=dm.DMinDDPMPipeline)
    directory = tmp_path_factory.mktemp("small") / "index"
    pipe.build_attribution_index(make_image_dataset(3), directory, config=dm.DMinConfig(
        num_timesteps=2, projection_dim=256), progress=False)
    return directory


DEEP = "[" * 200_000 + "]" * 200_000
HOSTILE = {  # file: what replaces it (the manifest re-records its checksum, as a hostile writer would)
    "deeply nested config": ("dmin_config.json", DEEP),
    "deeply nested dataset reference": ("dataset.json", '{"num_rows": ' + DEEP + "}"),
    "huge integer": ("dmin_config.json", None),
    "huge float": ("dmin_config.json", None),
    "wrong type": ("dataset.json", '["not", "an", "object"]'),
    "wrong field type": ("dmin_config.json", None),
}


def hostile_copy(small_index, tmp_path, case) -> Path:
    directory = tmp_path / "hostile"
    shutil.copytree(small_index, directory)
    name, text = HOSTILE[case]
    if text is None:
        config = json.loads((directory / name).read_text())
        config.update({"huge integer": {"num_timesteps": 10**1000}, "huge float": {"projection_dim": 1e999},
                       "wrong field type": {"timesteps": {"a": 1}}}[case])
        text = json.dumps(config)
    (directory / name).write_text(text)
    record_files(directory, [name])
    return directory


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_json_in_an_index_is_one_line(case, small_index, tmp_path, capsys, monkeypatch):
    pushed = []
    monkeypatch.setattr(dm.AttributionIndex, "push_to_hub", lambda self, *args, **kwargs: pushed.append(self))
    directory = hostile_copy(small_index, tmp_path, case)
    assert main(["push", "--index", str(directory), "--repo_id", "user/index"]) == 2
    line = one_error_line(capsys, "push")
    assert "error: " in line and len(line) < 1100 and not pushed


def test_the_installed_command_exits_with_2_and_one_line(small_index, tmp_path):
    directory = hostile_copy(small_index, tmp_path, "deeply nested config")
    command = Path(sys.executable).with_name("dmin")
    assert command.exists(), "the package is installed with its `dmin` entry point"
    process = subprocess.run([str(command), "push", "--index", str(directory), "--repo_id", "user/index"],
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 2
    lines = [line for line in process.stderr.splitlines() if line.startswith("dmin ") or "Traceback" in line]
    assert len(lines) == 1 and lines[0].startswith("dmin push: error: "), process.stderr


@pytest.mark.parametrize("error, line", [
    (KeyError("files"), "dmin push: error: KeyError: 'files'"),  # unexpected: with its type
    (ValueError("first line\n  second line\n"), "dmin push: error: first line second line"),  # folded
])
def test_every_error_is_one_line(error, line, capsys, monkeypatch):
    def boom(args):
        raise error

    monkeypatch.setattr(cli, "run_push", boom)
    assert main(["push", "--index", "x", "--repo_id", "user/x"]) == 2
    assert one_error_line(capsys, "push") == line


# ------------------------------------------------------------------------------------------ attribute, app


class FakePipeline:
    """Stands for a loaded pipeline: records the image given to `attribute` and the page's launch."""

    def __init__(self):
        self.images = []

    def load_attribution_index(self, *args, **kwargs):
        pass

    def attribute(self, image, prompt, top_k, exact):
        self.images.append(image)
        return argparse.Namespace(indices=[0], scores=[1.0])


def test_attribute_opens_the_image_with_its_exif_orientation(tmp_path, capsys, monkeypatch):
    image = PIL.Image.new("RGB", (40, 20), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: shown (and read by `datasets`) as 20 x 40
    image.save(tmp_path / "photo.jpg", exif=exif)
    fake = FakePipeline()
    monkeypatch.setattr(cli, "load_pipeline", lambda args: fake)
    assert main(["attribute", "--pretrained_model_name_or_path", "user/base", "--index", "x", "--image",
                 str(tmp_path / "photo.jpg")]) == 0
    assert fake.images[0].size == (20, 40)


@pytest.mark.parametrize("given, expected", [
    ([], {}),  # Gradio then reads GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else 127.0.0.1:7860
    (["--port", "7999"], {"server_port": 7999}),
    (["--host", "0.0.0.0", "--port", "7999"], {"server_name": "0.0.0.0", "server_port": 7999}),
])
def test_the_page_is_launched_with_only_the_settings_given(given, expected, monkeypatch):
    import dmin_diffusers.app as app

    launched = []
    demo = argparse.Namespace(launch=lambda **kwargs: launched.append(kwargs))
    monkeypatch.setattr(cli, "load_pipeline", lambda args: FakePipeline())
    monkeypatch.setattr(app, "load_app_dataset", lambda *args: None)
    monkeypatch.setattr(app, "build_app", lambda pipeline, **kwargs: demo)
    assert main(["app", "--pretrained_model_name_or_path", "user/base", "--index", "x", *given]) == 0
    assert launched == [expected]


# ---------------------------------------------------------------------------------------------- exports


def library_modules():
    import dmin_diffusers.callbacks

    for package in (dm, dmin_diffusers.callbacks):
        yield package
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            yield importlib.import_module(module.name)


def test_every_error_the_library_defines_is_exported():
    defined = {
        cls for module in library_modules() for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__.split(".")[0] in ("dmin_diffusers", "callbacks")
    }
    assert {dm.IndexBusyError, dm.IndexIntegrityError} <= defined
    for cls in defined:
        assert getattr(dm, cls.__name__, None) is cls and cls.__name__ in dm.__all__, cls
