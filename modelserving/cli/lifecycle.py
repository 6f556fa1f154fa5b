"""``modelserving validate`` and what ``publish model`` attaches for the model lifecycle.

    modelserving validate MODEL --data FILE [--min-accuracy A] [--tolerance T]
        scores FILE's records with the model as the job's validation gate does; exit 0 when
        it passes, 1 when it fails (a CI pipeline's check before publishing)
    modelserving publish model MODEL ... --validation FILE --reference FILE --quality K=V
        attaches a validation gate, drift references and quality metrics to the descriptor

FILE: CSV with a header (feature columns by name; ``label`` / ``score``: the expected
outputs; ``id``) or JSON lines (``udfs.lifecycle.validation.read_rows``). ``modelserving
train`` writes the demo's ``holdout.csv`` and ``training.csv`` beside its models.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from modelserving.errors import ToolError, UsageError
from udfs.runtimes import FORMAT_NAMES

#: Offline, nothing bounds a model's size but the machine (the job applies max_model_bytes).
_NO_SIZE_LIMIT = 1 << 62


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options that describe a model file (``publish model`` and ``validate``)."""
    parser.add_argument("path", help="the model file, or SavedModel directory")
    parser.add_argument("--name", default="")
    parser.add_argument("--version", default="")
    parser.add_argument("--description", default="")
    parser.add_argument("--type", choices=FORMAT_NAMES, help="model type; guessed from the path when absent")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--location", action="store_true", help="send the path, not the bytes")
    how.add_argument("--inline", action="store_true", help="send the bytes (default for files)")
    parser.add_argument("--input-features", help="comma-separated input order for vector models")
    parser.add_argument("--class-labels", help="comma-separated class labels")


def descriptor_of(args, data_type: str):
    """The descriptor of the model at ``args.path``; the manifest ``train`` wrote beside it
    fills what the options leave out (name, version, features, labels, quality metrics)."""
    from modelserving.demo.training import manifest_entry
    from modelserving.kafka import clients
    from protos import ModelType

    trained = manifest_entry(args.path)
    try:
        descriptor = clients.model_descriptor(
            args.path, data_type, name=args.name or (trained.name if trained else ""),
            version=args.version or (trained.version if trained else ""),
            description=args.description or (trained.description if trained else ""),
            model_type=ModelType.Value(args.type) if args.type else None,
            by_location=True if args.location else (False if args.inline else None),
            input_features=(args.input_features.split(",") if args.input_features
                            else trained.input_features if trained else ()),
            class_labels=(args.class_labels.split(",") if args.class_labels
                          else trained.class_labels if trained else ()))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the model {args.path}: {exc}") from None
    if trained is not None:
        descriptor.qualityMetrics.update(trained.quality_metrics)
    return descriptor


def add_gate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest |score - expected score| accepted (default 1e-6)")
    parser.add_argument("--min-accuracy", type=float, default=None,
                        help="smallest share of expected labels to match (default: all of them)")


def add_lifecycle_options(parser: argparse.ArgumentParser) -> None:
    """``publish model``'s options for the validation gate, drift and quality metrics."""
    parser.add_argument("--validation", metavar="FILE",
                        help="records with expected outputs the job checks the model on "
                             "before it takes over (checked here first)")
    add_gate_options(parser)
    parser.add_argument("--force", action="store_true",
                        help="publish even when the validation fails here (the job will refuse "
                             "the model: shows the gate at work)")
    parser.add_argument("--reference", metavar="FILE",
                        help="training data: the drift reference per feature, and of the "
                             "model's outputs (on the validation records, else on these)")
    parser.add_argument("--reference-bins", type=int, default=10, help="bins per histogram")
    parser.add_argument("--quality", action="append", default=[], metavar="NAME=VALUE",
                        help="a quality metric published with the model (repeatable)")


def add_rollout_options(parser: argparse.ArgumentParser) -> None:
    """``publish model``'s ``--canary SHARE`` and ``--shadow``: the model becomes its data
    type's candidate beside the model serving it, rather than replacing it."""
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--canary", metavar="SHARE",
                     help="deploy the model as its data type's canary beside the model serving "
                          "it: it answers SHARE of the records (0.1 or 10%%, in (0, 1]), chosen "
                          "by record id; `models promote` or `models abort` ends it")
    how.add_argument("--shadow", action="store_true",
                     help="deploy the model as its data type's shadow: it scores every record "
                          "beside the model serving it, only to be compared (its results go to "
                          "the shadow topic); `models promote` or `models abort` ends it")


def rollout_of(args):
    """The ``Rollout`` (DEPLOY) that ``--canary`` or ``--shadow`` ask for; None without them
    (the model replaces the data type's model). Raises ``UsageError`` for a share outside
    (0, 1], before anything is read or sent."""
    from protos import Rollout

    if getattr(args, "shadow", False):
        return Rollout(action=Rollout.DEPLOY, mode=Rollout.SHADOW)
    if getattr(args, "canary", None) is None:
        return None
    return Rollout(action=Rollout.DEPLOY, mode=Rollout.CANARY, share=canary_share(args.canary))


def canary_share(text: str) -> float:
    """``--canary``'s share: a fraction ("0.1") or a percentage ("10%"), in (0, 1]."""
    text = text.strip()
    try:
        share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        share = math.nan
    if not 0.0 < share <= 1.0:     # NaN fails this too
        raise UsageError(f"--canary takes the share of the records the candidate answers, in "
                         f"(0, 1] (0.1, or 10%), not {text!r}")
    return share


def attach_lifecycle(descriptor, args) -> None:
    """Add to ``descriptor`` what the lifecycle options ask for; the model is loaded and
    checked here when they need it. Raises ``ToolError`` when its validation fails."""
    from protos import Reference
    from udfs.lifecycle.drift import add_output_reference, reference_from_matrix
    from udfs.lifecycle.validation import validation_from_rows

    descriptor.qualityMetrics.update(_quality(args.quality))
    rows = _rows(args.validation) if args.validation else None
    reference_rows = _rows(args.reference) if args.reference else None
    if rows is None and reference_rows is None:
        return
    if rows is not None:
        descriptor.validation.CopyFrom(_validation(rows, descriptor.dataType, args))
    predictions = None
    if rows is not None:
        outcome = _check(descriptor, descriptor.validation, args.path)
        print(outcome.reason)
        if not outcome.passed and not args.force:
            raise ToolError(f"not published: {outcome.reason}")
        predictions = outcome.predictions
    try:
        if reference_rows is not None:
            names = list(reference_rows[0].features)
            if any(list(row.features) != names for row in reference_rows):
                raise ValueError(f"{args.reference}: every row needs the same features")
            reference = reference_from_matrix(
                names, [[row.features[n] for n in names] for row in reference_rows],
                bins=args.reference_bins, source=f"{Path(args.reference).name}, "
                                                 f"{len(reference_rows)} rows")
            if predictions is None:   # the model's outputs on the reference data instead
                scoring = validation_from_rows(reference_rows, descriptor.dataType,
                                               max_rows=len(reference_rows))
                predictions = _check(descriptor, scoring, args.path).predictions
        else:
            reference = Reference(source=f"validation outputs of {Path(args.validation).name}")
        add_output_reference(reference, predictions, bins=args.reference_bins)
    except ValueError as exc:
        raise UsageError(f"cannot build the drift reference: {exc}") from None
    descriptor.reference.CopyFrom(reference)


def cmd_validate(args) -> int:
    """Exit 0 when the model passes, 1 when it fails, as the job's gate would decide."""
    from google.protobuf.json_format import MessageToDict

    descriptor = descriptor_of(args, args.data_type)
    validation = _validation(_rows(args.data), args.data_type, args)
    outcome = _check(descriptor, validation, args.path)
    if args.json:
        print(json.dumps(MessageToDict(outcome.figures(), always_print_fields_with_no_presence=True),
                         sort_keys=True))
        return 0 if outcome.passed else 1
    print(outcome.reason)
    print(f"  rows {outcome.rows} (unscored {outcome.unscored})")
    if outcome.score_rows:
        print(f"  scores: {outcome.score_rows} expected, max |error| {outcome.max_abs_error:.6g}, "
              f"tolerance {outcome.tolerance:g}")
    if outcome.label_rows:
        print(f"  labels: {outcome.label_rows} expected, {outcome.mismatches} mismatched, "
              f"accuracy {outcome.accuracy:.4f}, minimum {outcome.min_accuracy:g}")
    return 0 if outcome.passed else 1


def _rows(path: str):
    from udfs.lifecycle.validation import read_rows

    try:
        rows = read_rows(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    if not rows:
        raise UsageError(f"{path} has no rows")
    return rows


def _validation(rows, data_type: str, args):
    from udfs.lifecycle.validation import validation_from_rows

    for name, value in (("--tolerance", args.tolerance), ("--min-accuracy", args.min_accuracy)):
        if value is not None and not (value >= 0 and (name != "--min-accuracy" or value <= 1)):
            raise UsageError(f"{name} {value} is out of range")
    try:
        return validation_from_rows(rows, data_type, tolerance=args.tolerance,
                                    min_accuracy=args.min_accuracy)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check(descriptor, validation, path: str):
    """The gate's outcome of ``validation`` for the model of ``descriptor``, loaded here
    under the job's policies (its directory is the only model directory)."""
    from protos import ModelDescriptor
    from udfs.errors import ModelError
    from udfs.lifecycle.validation import check_descriptor

    checked = ModelDescriptor()
    checked.CopyFrom(descriptor)
    checked.validation.CopyFrom(validation)
    model_dir = Path(path).resolve().parent
    try:
        return check_descriptor(checked, [model_dir], _NO_SIZE_LIMIT)
    except ModelError as exc:
        raise ToolError(f"the model could not be loaded: {exc}") from None


def _quality(pairs: list[str]) -> dict[str, float]:
    metrics = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            metrics[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--quality takes NAME=NUMBER, not {pair!r}") from None
    return metrics


def register(sub) -> None:
    validate = sub.add_parser(
        "validate", help="check a model on records with expected outputs (exit 1 when it fails)",
        description="Score FILE's records with the model exactly as the job's validation gate "
                    "does, print the figures, exit 0 when it passes and 1 when it fails.")
    add_model_options(validate)
    validate.add_argument("--data", required=True, metavar="FILE",
                          help="CSV (header; 'label'/'score' columns: expected outputs) or JSON lines")
    validate.add_argument("--data-type", default="validation",
                          help="the data type the records are written with (it changes nothing)")
    add_gate_options(validate)
    validate.add_argument("--json", action="store_true", help="print the figures as JSON")
    validate.set_defaults(func=cmd_validate)
