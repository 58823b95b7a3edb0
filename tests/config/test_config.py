"""Config loading: schema types, overrides, unknown keys, inheritance, path resolution."""

from pathlib import Path

import pytest

from sparsehead.config import DEFAULT_CONFIG, ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def base_yaml(tmp_path):
    return _write(
        tmp_path / "base.yaml",
        "output_dir: out\n"
        "data:\n  train: {ann_file: a.json, img_dir: imgs}\n  val: {ann_file: b.json, img_dir: imgs}\n",
    )


def test_defaults_and_typed_overrides(base_yaml):
    cfg = load_config(
        base_yaml,
        ["solver.max_iter=10", "solver.steps=[4,8]", "solver.base_lr=0.02", "solver.amp=true",
         "model.head.execution=dense", "solver.ims_per_batch=4"],
    )
    assert cfg.solver.max_iter == 10 and isinstance(cfg.solver.max_iter, int)
    assert list(cfg.solver.steps) == [4, 8]
    assert cfg.solver.base_lr == pytest.approx(0.02)
    assert cfg.solver.amp is True
    assert cfg.model.head.execution == "dense"
    assert cfg.model.score_thresh == pytest.approx(0.05)


@pytest.mark.parametrize(
    "override, key",
    [("solver.max_itr=3", "solver.max_itr"), ("model.head.foo=1", "model.head.foo"), ("nope=1", "nope")],
)
def test_unknown_key_is_named(base_yaml, override, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(base_yaml, [override])


@pytest.mark.parametrize(
    "override, key",
    [("solver.max_iter=ten", "solver.max_iter"), ("solver.amp=maybe", "solver.amp"),
     ("solver.steps=5", "solver.steps"), ("model.backbone=3", "model.backbone")],
)
def test_wrong_type_is_named(base_yaml, override, key):
    with pytest.raises(ConfigError, match=f"invalid value for '{key}'"):
        load_config(base_yaml, [override])


@pytest.mark.parametrize(
    "override, key",
    [("model.head.kind=big", "model.head.kind"), ("model.head.execution=fast", "model.head.execution"),
     ("model.backbone.depth=101", "model.backbone.depth"), ("solver.max_iter=0", "solver.max_iter"),
     ("solver.steps=[8,4]", "solver.steps"), ("model.num_classes=0", "model.num_classes"),
     ("num_threads=-1", "num_threads"), ("cpu_allocator=jemalloc", "cpu_allocator"),
     ("model.head.resample=nearest", "model.head.resample"),
     ("model.head.budget_warmup=-5", "model.head.budget_warmup"), ("model.head.box_init=-1", "model.head.box_init")],
)
def test_bad_values_are_named(base_yaml, override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(base_yaml, [override])


def test_override_without_equals(base_yaml):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(base_yaml, ["solver.max_iter"])


def test_unknown_key_in_file(tmp_path, base_yaml):
    child = _write(tmp_path / "child.yaml", "_base_: base.yaml\nsolver:\n  max_iters: 3\n")
    with pytest.raises(ConfigError, match="child.yaml: unknown config key 'solver.max_iters'"):
        load_config(child)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path / "bad.yaml", "solver: [unclosed\n"))


def test_base_inheritance_and_relative_paths(tmp_path, base_yaml, monkeypatch):
    child = _write(tmp_path / "child.yaml", "_base_: base.yaml\nsolver:\n  max_iter: 7\n")
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    cfg = load_config(child, ["solver.base_lr=0.5"])
    assert cfg.solver.max_iter == 7 and cfg.solver.base_lr == 0.5
    # relative paths are resolved against the current directory, not the config's folder
    assert cfg.output_dir == str(run_dir / "out")
    assert cfg.data.train.ann_file == str(run_dir / "a.json")


def test_missing_data_paths(tmp_path):
    cfg_file = _write(tmp_path / "c.yaml", "output_dir: out\n")
    with pytest.raises(ConfigError, match="data.train.ann_file"):
        load_config(cfg_file)


def test_synthetic_points_data_paths_into_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(DEFAULT_CONFIG, ["data.synthetic.root=ds"])
    root = tmp_path / "ds"
    assert cfg.data.train.ann_file == str(root / "annotations" / "train.json")
    assert cfg.data.val.img_dir == str(root / "val")
    with pytest.raises(ConfigError, match="model.num_classes"):
        load_config(DEFAULT_CONFIG, ["data.synthetic.num_classes=3"])


def test_config_rejects_unknown_attribute(base_yaml):
    cfg = load_config(base_yaml)
    with pytest.raises(Exception, match="solver"):
        cfg.solver.not_a_key = 1


def test_demo_config():
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.data.synthetic.enabled
    assert cfg.model.head.kind == "dynamic" and cfg.model.head.execution == "sparse"
    assert 2 <= cfg.model.head.num_routers <= 4
    assert cfg.model.head.budget_weight == pytest.approx(0.15) and cfg.solver.base_lr == pytest.approx(0.03)
    assert cfg.model.head.budget_warmup == 150 < cfg.solver.max_iter
    assert cfg.model.head.box_init == pytest.approx(1.0)
    assert cfg.model.backbone.depth == 18
    assert cfg.output_dir.endswith("output/demo")


def test_demo_retinanet_config():
    cfg = load_config(CONFIGS / "demo_retinanet.yaml")
    demo = load_config(DEFAULT_CONFIG)
    assert cfg.model.arch == "retinanet" and demo.model.arch == "fcos"
    assert cfg.model.head.norm == "gn" and demo.model.head.norm == "none"  # only the plain head's towers differ
    # RetinaNet keeps its own routers, budget and learning rate; everything else is the FCOS demo's.
    head = cfg.model.head
    assert (head.num_routers, head.budget_weight, head.budget_warmup, cfg.solver.base_lr) == (
        2, pytest.approx(0.1), 0, pytest.approx(0.02))
    head.norm, head.num_routers, head.budget_weight, head.budget_warmup = "none", 3, 0.15, 150
    cfg.solver.base_lr = 0.03
    assert cfg.model.head == demo.model.head and cfg.solver == demo.solver and cfg.data == demo.data
    assert cfg.output_dir.endswith("output/demo_retinanet")


def test_empty_override_sets_empty_string(base_yaml):
    cfg = load_config(base_yaml, ["model.backbone.weights="])
    assert cfg.model.backbone.weights == ""


@pytest.mark.parametrize(
    "override, key",
    [("model.arch=ssd", "model.arch"), ("model.anchor_sizes=[32,64]", "model.anchor_sizes"),
     ("model.backbone.fpn_channels=48", "model.backbone.fpn_channels"), ("model.head.norm=bn", "model.head.norm")],
)
def test_model_choices_are_named(base_yaml, override, key):
    overrides = [override] + (["model.head.kind=plain", "model.head.gn_groups=16"] if "fpn" in override else [])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(base_yaml, overrides)


@pytest.mark.parametrize(
    "name, kind, routers, lam",
    [("fcos_R50_1x", "plain", None, None), ("fix_D4_R50_1x", "fixed", 4, None),
     ("fix_D8_R50_1x", "fixed", 8, None),
     ("dynamic_D4_lambda0.1_R50_1x", "dynamic", 4, 0.1), ("dynamic_D8_lambda0_R50_1x", "dynamic", 8, 0.0),
     ("dynamic_D8_lambda0.1_R50_1x", "dynamic", 8, 0.1), ("dynamic_D8_lambda0.8_R50_1x", "dynamic", 8, 0.8),
     ("retinanet_R50_1x", "plain", None, None), ("dynamic_retinanet_D8_lambda0.1_R50_1x", "dynamic", 8, 0.1)],
)
def test_paper_configs(name, kind, routers, lam):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.arch == ("retinanet" if "retinanet" in name else "fcos")
    assert cfg.model.head.kind == kind
    if routers is not None:
        assert cfg.model.head.num_routers == routers
    if lam is not None:
        assert cfg.model.head.budget_weight == pytest.approx(lam)
    assert cfg.model.head.tau == pytest.approx(1.5)
    # The reference implementation's choices (docs/paper.md).
    assert cfg.model.head.resample == "bilinear" and cfg.model.head.scale_bias
    s = cfg.solver
    assert (s.base_lr, s.ims_per_batch, s.max_iter, list(s.steps)) == (0.01, 16, 90000, [60000, 80000])
    assert (cfg.model.min_size, cfg.model.max_size, cfg.model.backbone.weights) == (800, 1333, "imagenet")
    assert cfg.model.backbone.depth == 50 and cfg.model.num_classes == 80
    assert cfg.output_dir.endswith(name)


def test_explicit_data_paths_switch_the_generated_dataset_off(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    paths = ["data.train.ann_file=my/train.json", "data.train.img_dir=my/img",
             "data.val.ann_file=my/val.json", "data.val.img_dir=my/img"]
    cfg = load_config(DEFAULT_CONFIG, paths)  # demo.yaml enables data.synthetic
    assert not cfg.data.synthetic.enabled
    assert cfg.data.train.ann_file == str(tmp_path / "my" / "train.json")
    assert cfg.data.val.img_dir == str(tmp_path / "my" / "img")
    assert "switched off" in caplog.text
    # one path alone: the others must be named, not silently taken from the generated dataset
    with pytest.raises(ConfigError, match=r"data.train.img_dir, data.val.ann_file, data.val.img_dir must be set"):
        load_config(DEFAULT_CONFIG, paths[:1])
    # both asked for on the command line: a conflict
    with pytest.raises(ConfigError, match="data.synthetic.enabled=true and data.train.ann_file"):
        load_config(DEFAULT_CONFIG, ["data.synthetic.enabled=true", *paths])
    # a saved run's config (synthetic on, paths pointing into its root) keeps the generated dataset
    saved = load_config(DEFAULT_CONFIG, ["data.synthetic.root=ds"])
    again = load_config(DEFAULT_CONFIG, [f"data.synthetic.root={saved.data.synthetic.root}",
                                         f"data.train.ann_file={saved.data.train.ann_file}"])
    assert again.data.synthetic.enabled


def test_num_classes_unset_is_inferred_or_checked(tmp_path, base_yaml):
    assert load_config(base_yaml).model.num_classes is None  # inferred from the annotations when training
    assert load_config(base_yaml, ["model.num_classes=3"]).model.num_classes == 3
    demo = load_config(DEFAULT_CONFIG, ["model.num_classes=null", "data.synthetic.num_classes=4"])
    assert demo.model.num_classes == 4
    with pytest.raises(ConfigError, match="model.num_classes"):
        load_config(DEFAULT_CONFIG, ["model.num_classes=5", "data.synthetic.num_classes=4"])


def _tiny_model_overrides():
    return ["model.backbone.fpn_channels=32", "model.head.gn_groups=8", "model.head.num_routers=1",
            "model.min_size=64", "model.max_size=64", "device=cpu"]


@pytest.mark.parametrize("given", [None, 0.2])
def test_auto_uses_the_shipped_crossover_unless_a_threshold_is_given(given):
    from sparsehead.benchmark.crossover import load_crossover
    from sparsehead.modeling.build import build_model
    from sparsehead.modeling.router import Router

    overrides = _tiny_model_overrides() + ["model.head.execution=auto"]
    if given is not None:
        overrides.append(f"model.head.auto_threshold={given}")
    model = build_model(load_config(DEFAULT_CONFIG, overrides))
    expected = given if given is not None else load_crossover(device="cpu")
    thresholds = {m.auto_threshold for m in model.modules() if isinstance(m, Router)}
    assert thresholds == {expected}
    with pytest.raises(ConfigError, match="model.head.auto_threshold"):
        load_config(DEFAULT_CONFIG, ["model.head.auto_threshold=1.5"])


def test_packaged_config_by_name(tmp_path, monkeypatch):
    from sparsehead.config import CONFIG_DIR, packaged_configs, resolve_config

    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert "demo" in packaged_configs() and "fcos_R50_1x" in packaged_configs()
    assert resolve_config("demo") == CONFIG_DIR / "demo.yaml" == resolve_config("demo.yaml")
    assert load_config("demo").model.num_classes == load_config(CONFIGS / "demo.yaml").model.num_classes
    assert load_config("fcos_R50_1x").model.num_classes == 80  # its _base_ is found beside it
    local = _write(tmp_path / "demo.yaml", "output_dir: mine\ndata:\n  synthetic: {enabled: true}\n")
    assert load_config("demo.yaml").output_dir == str(tmp_path / "mine")  # a file here wins
    local.unlink()
    with pytest.raises(ConfigError, match=r"config file not found: nodemo \(packaged configs: .*demo"):
        load_config("nodemo")
