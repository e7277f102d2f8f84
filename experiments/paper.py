"""Planning a whole experiment in one step: ``neureg plan paper`` registers Li et al. 2019's experiment.

Everything the experiment needs is a row of a config or plan table (predictor config, scan set, target
configs, dataset, network / schedule / regularizer configs, training plans, seeds, robustness configs);
the workers then fill every computed table from those rows with no further choices. ``plan_paper``
writes them all in ONE transaction: a bad argument (a wrong CIFAR folder, too few scans) or a fault
part-way leaves the database as it was, and ``dry_run`` is the very same run rolled back, so what it
lists is exactly what a real run would write, each item marked "new" or "exists".

Scan sets are fixed: scans ingested after a plan are not added to its set. Running the plan again makes a
new set of every scan (with new targets and training plans over it); existing targets never change
underneath the networks trained on them.
"""

from __future__ import annotations

import datajoint as dj

from ..database.transaction import transaction
from ..errors import DatasetError, PlanError
from ..models.conditions import condition_name
from ..models.digests import plain
from ..models.neural.targets import methods_reading
from ..models.vision import datasets

# Li et al., "Learning from brains how to regularize machines", NeurIPS 2019 (arXiv:1911.05072): the
# similarity loss weight of the main-text results, L = L_task + alpha * L_sim. Every regularized condition
# (Shuffle, Neural, Pixel) uses it, so the conditions differ in their target only.
PAPER_ALPHA = 20.0
# The resolution the field fits mouse-V1 predictive models at (144x256 stimuli -> 36x64). Every target
# of the experiment uses it, so all regularized conditions see the stimuli at the same size.
PAPER_IMAGE_SCALE = 0.25
PAPER_TARGET_METHODS = ("neural_model", "neural_data", "shuffle", "pixel", "pixel_threshold")
# The networks trained: (network config, similarity method of its target or None for alpha = 0). Each one's
# condition label (None, Shuffle, Neural (model), Pixel, VOne) is ``models.conditions.condition_name``'s.
PAPER_RUNS = (
    ({"arch": "resnet18"}, None),
    ({"arch": "resnet18"}, "shuffle"),
    ({"arch": "resnet18"}, "neural_model"),
    ({"arch": "resnet18"}, "pixel"),
    ({"arch": "vone_resnet18"}, None),
)
DATASET = "cifar10"


MAX_SEEDS = 1000  # each seed is one network per condition: 1000 is weeks of GPU time, more is a typo


def plan_paper(pipeline, cifar_root, seeds: int = 5, dry_run: bool = False) -> list[dict]:
    """Register Li et al. 2019's experiment on every ingested scan, so the workers can run it unattended.

    Returns one dict per row involved, in order: ``table`` (``stage.Class``), ``key``, ``label`` (what the
    row says about itself) and ``status`` ("new" or "exists"). ``dry_run`` writes nothing. Raises
    PlanError for fewer than two usable scans, ``seeds`` < 1, or an unreadable CIFAR-10 folder.
    """
    if not 1 <= int(seeds) <= MAX_SEEDS:
        raise PlanError(f"--seeds must be 1..{MAX_SEEDS} (networks per condition), got {seeds}")
    scans, left_out = usable_scans(pipeline.experiment)
    if len(scans) < 2:
        unusable = f" ({len(left_out)} more without usable repeats: see neureg status)" if left_out else ""
        raise PlanError(
            f"{len(scans)} scan(s) ingested{unusable}; the experiment needs at least 2 (neureg ingest PATH ...)"
        )
    loaded = read_cifar10(cifar_root)
    note = f"paper: all {len(scans)} scans"
    note += f" ({len(left_out)} without usable repeats left out)" if left_out else ""
    connection = _connection(pipeline)
    for attempt in (1, 2):
        try:
            with transaction(connection, commit=not dry_run):
                return _register(pipeline, scans, note, loaded, cifar_root, int(seeds))
        except dj.errors.DuplicateError:  # another process planned the same rows at the same moment
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def usable_scans(experiment) -> tuple[list[dict], list[dict]]:
    """(scans the experiment can use, scans left out): a scan whose repeats all lack responses never gets
    oracle statistics, and a set holding it would never get a target, so it is left out of the set."""
    left_out = experiment.scans_without_usable_repeats().keys(order_by="KEY")
    sealed = (experiment.Scan & experiment.Ingestion).keys(order_by="KEY")  # hand-made, unsealed rows never count
    return [k for k in sealed if k not in left_out], left_out


def read_cifar10(root) -> datasets.ClassificationData:
    """CIFAR-10 as training will read it, so a wrong folder is refused before anything is written."""
    try:
        return datasets.load_dataset(DATASET, root)
    except DatasetError as exc:
        message = str(exc).replace("\n", " ")
        raise PlanError(f"cannot read grayscale CIFAR-10 from --cifar {root}: {message}") from None


def _connection(pipeline):
    connections = {id(m.schema.connection): m.schema.connection for m in pipeline.modules().values()}
    if len(connections) != 1:
        raise RuntimeError("the pipeline's schemas are not on one connection; one transaction cannot span them")
    return next(iter(connections.values()))


class _Ledger:
    """The rows a plan touches, in order, each marked against the tables as they were when the plan began."""

    def __init__(self, tables):
        self.before = {table: {_key_tuple(k) for k in table().keys()} for table in tables}
        self.items: list[dict] = []
        self._seen: set = set()

    def note(self, table, key: dict) -> dict:
        """Record one row (once, however often the plan names it); return its key."""
        key = {k: plain(v) for k, v in key.items()}
        name = f"{table.__module__.rsplit('.', 1)[-1]}.{table.__name__}"
        if (name, _key_tuple(key)) not in self._seen:
            self._seen.add((name, _key_tuple(key)))
            status = "exists" if _key_tuple(key) in self.before.get(table, set()) else "new"
            self.items.append({"table": name, "key": key, "label": _label(table, key), "status": status})
        return key


def _key_tuple(key: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in key.items()))


def _label(table, key: dict) -> str:
    """What a row says about itself: its label, note, condition or data folder ('' if it has none)."""
    column = {
        "ScanSet": "scan_set_note",
        "TrainingPlan": "condition",
        "Dataset": "data_root",
        "RegularizerConfig": "regularizer_label",
    }.get(table.__name__)
    if column is None and getattr(table, "config_name", None):
        column = f"{table.config_name}_label"
    return str((table & key).fetch1(column)) if column else ""


def _register(pipeline, scans: list[dict], note: str, loaded, cifar_root, seeds: int) -> list[dict]:
    """Every row of the experiment, added if new (inside the caller's transaction)."""
    ex, pr, si, tr, rb = (
        pipeline.experiment,
        pipeline.predictive,
        pipeline.similarity,
        pipeline.training,
        pipeline.robustness,
    )
    robustness_tables = _config_tables(rb)
    ledger = _Ledger(
        [
            pr.PredictorConfig,
            ex.ScanSet,
            si.TargetConfig,
            tr.Dataset,
            tr.NetworkConfig,
            tr.TrainConfig,
            tr.RegularizerConfig,
            tr.TrainingPlan,
            tr.Seed,
            *robustness_tables,
        ]
    )

    predictor = ledger.note(
        pr.PredictorConfig, pr.PredictorConfig.add({"image_scale": PAPER_IMAGE_SCALE}, label="paper")
    )
    scan_set = ledger.note(ex.ScanSet, ex.ScanSet.create(scans, note=note))
    target_keys = {}
    for method in PAPER_TARGET_METHODS:
        reads_model = method in methods_reading("model")  # a target built from S^model names its predictor
        config = {"method": method, **(predictor if reads_model else {"image_scale": PAPER_IMAGE_SCALE})}
        target_keys[method] = ledger.note(si.TargetConfig, si.TargetConfig.add(config, label=f"paper {method}"))

    _record_dataset(tr.Dataset, loaded, cifar_root)
    ledger.note(tr.Dataset, {"dataset": DATASET})
    for network, method in PAPER_RUNS:
        regularizer = {"alpha": PAPER_ALPHA if method else 0.0}
        condition = condition_name(network, regularizer, method)
        target = dict(scan_set, **target_keys[method]) if method else None
        labels = {"network": f"paper {network['arch']}", "train": "paper", "regularizer": f"paper {condition}"}
        key = tr.plan(DATASET, network, None, regularizer, target=target, data_root=str(cifar_root), labels=labels)
        for table, attribute in (
            (tr.NetworkConfig, "network_hash"),
            (tr.TrainConfig, "train_hash"),
            (tr.RegularizerConfig, "regularizer_hash"),
        ):
            ledger.note(table, {attribute: key[attribute]})
        ledger.note(tr.TrainingPlan, key)
    tr.Seed.insert([{"seed": s} for s in range(seeds)], skip_duplicates=True)
    for s in range(seeds):
        ledger.note(tr.Seed, {"seed": s})

    added = rb.add_standard_configs(dataset=DATASET)
    for value in added.values():
        for key in value if isinstance(value, list) else [value]:
            ledger.note(_table_of(robustness_tables, key), key)
    return ledger.items


def _record_dataset(dataset_table, loaded, cifar_root) -> None:
    """Record CIFAR-10 as read from ``cifar_root``; an existing row must hold the same numbers."""
    checksum = datasets.dataset_checksum(loaded)
    existing = dataset_table & {"dataset": DATASET}
    if not existing:
        dataset_table.record(loaded, cifar_root)
        return
    recorded, root = existing.fetch1("checksum", "data_root")
    if recorded != checksum:
        raise PlanError(
            f"--cifar {cifar_root} holds other data than the {DATASET} already recorded from {root} "
            "(its checksum differs); point --cifar at that copy"
        )


def _config_tables(module) -> list:
    return [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, dj.Table) and getattr(obj, "config_name", None)
    ]


def _table_of(tables, key: dict):
    """The config table whose ``<name>_hash`` the key holds."""
    return next(t for t in tables if f"{t.config_name}_hash" in key)


def describe(items: list[dict], dry_run: bool = False) -> str:
    """The items as a human reads them: one line each, then a summary and what to run next."""
    width = max((len(item["table"]) for item in items), default=10)
    lines = []
    for item in items:
        key = " ".join(f"{k}={_short(k, v)}" for k, v in item["key"].items())
        label = f"  ({item['label']})" if item["label"] else ""
        lines.append(f"{item['status']:<6}  {item['table']:<{width}}  {key}{label}")
    new = sum(item["status"] == "new" for item in items)
    plans = sum(item["table"] == "training.TrainingPlan" for item in items)
    seeds = sum(item["table"] == "training.Seed" for item in items)
    if dry_run:
        lines.append(f"dry run: {new} new row(s) would be added, {len(items) - new} exist; nothing was written")
    else:
        done = (
            f"added {new} new row(s), {len(items) - new} existed already"
            if new
            else f"nothing to add: all {len(items)} rows exist already"
        )
        lines.append(
            f"{done}; {plans} training plans, each trained once per seed in training.Seed "
            f"(seeds 0..{seeds - 1} are there)"
        )
        lines.append("next: neureg populate (or neureg worker on each GPU machine), then neureg report robustness")
    return "\n".join(lines)


def _short(attribute: str, value) -> str:
    text = str(value)
    return text[:10] if attribute.endswith("_hash") or attribute == "scan_set" else text
