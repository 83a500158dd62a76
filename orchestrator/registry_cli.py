"""What `kdflow models|promote|rollback|ui` print, and the closing summary of `kdflow run`: for a person
(aligned tables, plain words) by default, one JSON document with --json for scripts."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from tasks.errors import UserError
from tasks.layout import LOCAL_STATE_FOR_S3


def console(out: Any = None) -> Any:
    import sys

    from rich.console import Console

    stream = out or sys.stdout
    wide = None if stream.isatty() else int(os.environ.get("COLUMNS") or 160)  # piped: no 80-column wrap
    return Console(file=out, highlight=False, soft_wrap=True, width=wide)


def default_tracking_uri(args: argparse.Namespace) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the embedded store a `kdflow run` here wrote."""
    if getattr(args, "tracking_uri", None):
        return args.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = Path(getattr(args, "root", None) or LOCAL_STATE_FOR_S3) / "mlflow.db"
    if not db.is_file():
        raise UserError(f"no tracking store at {db} (run a workflow here first, or give --tracking-uri / --root)",
                        where="--root")
    return f"sqlite:///{db.resolve()}"


def client_for(args: argparse.Namespace) -> Any:
    import mlflow
    from mlflow import MlflowClient

    uri = default_tracking_uri(args)
    if uri.startswith(("http://", "https://")):
        from orchestrator.tracking import check_server

        check_server(uri, where="--tracking-uri")
    mlflow.set_tracking_uri(uri)
    return MlflowClient()


def _model(client: Any, name: str) -> Any:
    import mlflow

    try:
        return client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        names = [m.name for m in client.search_registered_models()]
        raise UserError("no such registered model" + (f" (there are: {', '.join(names)})" if names else ""),
                        where=name) from None


def _when(ms: int | None) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M") if ms else "-"


def _iso(t: str) -> str:
    return t.replace("T", " ").removesuffix("+00:00")


def _num(v: str | None, metric: str) -> str:
    if v is None:
        return "-"
    x = float(v)
    if metric == "num_params":
        return f"{int(x):,}"
    return f"{x:.2f}" if metric == "latency_ms" else f"{x:.4f}"


def versions_of(client: Any, name: str) -> list[dict[str, Any]]:
    """Every version with its aliases (from the registered model: a version search leaves them empty)."""
    from orchestrator.registry import version_kind
    from orchestrator.spec import gate_metrics
    from tasks.kinds import kinds

    recorded = {m for kind in kinds().values() for m in gate_metrics(kind)}  # metric tags, not lineage
    model = _model(client, name)
    by_version: dict[int, list[str]] = {}
    for alias, v in (model.aliases or {}).items():
        by_version.setdefault(int(v), []).append(alias)
    out = []
    for v in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        tags = dict(v.tags or {})
        gates = json.loads(tags["kdflow.gates"])["gates"] if "kdflow.gates" in tags else []
        out.append({"version": int(v.version), "aliases": sorted(by_version.get(int(v.version), [])),
                    "run_id": v.run_id, "created": _when(v.creation_timestamp),
                    "task": version_kind(tags).name,
                    "metrics": {m: tags.get(f"kdflow.{m}") for m, _ in version_kind(tags).headline},
                    "gates": gates, "promotion": tags.get("kdflow.promotion"),
                    "lineage": {k: v for k, v in tags.items() if k.startswith("kdflow.")
                                and not k.startswith(("kdflow.gate", "kdflow.promotion"))
                                and k.removeprefix("kdflow.") not in recorded}})
    return out


def _gate_summary(gates: list[dict[str, Any]]) -> str:
    if not gates:
        return "-"
    failed = [g["gate"] for g in gates if not g["passed"]]
    return f"FAIL {', '.join(failed)}" if failed else f"all {len(gates)} pass"


def cmd_models(args: argparse.Namespace) -> int:
    from orchestrator.registry import history

    client = client_for(args)
    out = console()
    if args.action == "list":
        return _models_list(client, out, args.json)
    if not args.name:
        raise UserError(f"models {args.action} needs a NAME (see `kdflow models list`)")
    if args.action == "history":
        _model(client, args.name)
        moves = history(client, args.name)
        if args.json:
            print(json.dumps(moves))
            return 0
        print_history(out, args.name, moves)
        return 0
    return _models_show(client, out, args)


def _models_list(client: Any, out: Any, as_json: bool) -> int:
    from rich.table import Table

    rows = []
    for m in client.search_registered_models():
        versions = client.search_model_versions(f"name='{m.name}'")
        rows.append({"name": m.name, "versions": len(versions),
                     "latest": max((int(v.version) for v in versions), default=None),
                     "aliases": {a: int(v) for a, v in sorted((m.aliases or {}).items())},
                     "updated": _when(m.last_updated_timestamp)})
    if as_json:
        print(json.dumps(rows))
        return 0
    if not rows:
        out.print("no registered models")
        return 0
    table = Table(title="registered models", title_justify="left")
    for col in ("model", "versions", "latest", "aliases", "updated (UTC)"):
        table.add_column(col, justify="right" if col in ("versions", "latest") else "left")
    for r in rows:
        table.add_row(r["name"], str(r["versions"]), f"v{r['latest']}" if r["latest"] else "-",
                      "  ".join(f"@{a} v{v}" for a, v in r["aliases"].items()) or "-", r["updated"])
    out.print(table)
    return 0


def _models_show(client: Any, out: Any, args: argparse.Namespace) -> int:
    from rich.table import Table

    from orchestrator.registry import history

    versions = versions_of(client, args.name)
    for v in versions:  # the data each version's run read: its MLflow dataset inputs
        v["datasets"] = run_datasets(client, v["run_id"])
    moves = history(client, args.name)
    if args.json:
        print(json.dumps({"model": args.name, "versions": versions, "history": moves}))
        return 0
    from tasks.kinds import kind_for

    # the newest version's kind names the columns (a registered model's versions are of one kind)
    headline = kind_for(versions[-1]["task"]).headline if versions else ()
    table = Table(title=f"{args.name}: {len(versions)} version(s)", title_justify="left")
    table.add_column("version", justify="right")
    table.add_column("aliases")
    for _, label in headline:
        table.add_column(label, justify="right")
    table.add_column("gates")
    table.add_column("registered (UTC)")
    for v in versions:
        table.add_row(f"v{v['version']}", " ".join(f"@{a}" for a in v["aliases"]) or "-",
                      *(_num(v["metrics"].get(m), m) for m, _ in headline), _gate_summary(v["gates"]), v["created"])
    out.print(table)
    _print_aliases(out, _model(client, args.name), moves, versions)
    shown = [v for v in versions if v["version"] == args.version] if args.version else versions[-1:]
    if not shown:
        raise UserError(f"no version {args.version}", where=args.name)
    _print_version(out, shown[0])
    return 0


def _print_aliases(out: Any, model: Any, moves: list[dict[str, Any]], versions: list[dict[str, Any]]) -> None:
    last = {m["alias"]: m for m in moves}  # moves are in time order: the last one per alias wins
    out.print("\n[bold]aliases[/]")
    for alias, version in sorted((model.aliases or {}).items()):
        m = last.get(alias)
        why = (f"since {_iso(m['time'])}, by {m['actor']}: {m['reason']}" if m and m["to"] == int(version)
               else "(moved outside kdflow: no record)")
        out.print(f"  @{alias:<11} v{version}  {why}")
    for v in versions:
        failed = [g for g in v["gates"] if not g["passed"]]
        if v["promotion"] or failed:
            out.print(f"  v{v['version']} when registered: {v['promotion'] or ''}")


def _print_version(out: Any, v: dict[str, Any]) -> None:
    out.print(f"\n[bold]v{v['version']}[/] gates and lineage (run {v['run_id']})")
    for g in v["gates"]:
        out.print(f"  {'pass' if g['passed'] else 'FAIL':<4}  {g['gate']:<14} {g['rule']}"
                  f"  (value {_value(g['value'])})" + (f"  {g['note']}" if g.get("note") else ""))
    width = max((len(k) for k in v["lineage"]), default=0)
    for k, val in sorted(v["lineage"].items()):
        out.print(f"  {k.removeprefix('kdflow.'):<{width}}  {val}")
    _print_datasets(out, v.get("datasets", []))


def run_datasets(client: Any, run_id: str | None) -> list[dict[str, Any]]:
    from mlflow.exceptions import MlflowException

    from orchestrator.lineage import dataset_lines

    try:
        return dataset_lines(client.get_run(run_id)) if run_id else []
    except MlflowException:  # the run was deleted: the version keeps its tags
        return []


def _print_datasets(out: Any, datasets: list[dict[str, Any]]) -> None:
    out.print("  data lineage (the run's MLflow dataset inputs):" if datasets else "  data lineage: none logged")
    for d in datasets:
        rows = f"{d['rows']} rows" if d["rows"] is not None else ""
        came = f"  from {d['teachers']}" if d.get("teachers") else ""
        out.print(f"    {d['context']:<12} {d['name']:<28} digest {d['digest']}  {rows}  {d['source']}{came}")


def _value(v: Any) -> str:
    from orchestrator.registry import fmt_value

    return fmt_value(v)


def print_history(out: Any, name: str, moves: list[dict[str, Any]]) -> None:
    from rich.table import Table

    if not moves:
        out.print(f"{name}: no alias moves recorded")
        return
    table = Table(title=f"{name}: alias moves, oldest first", title_justify="left")
    for col in ("time (UTC)", "alias", "from", "to", "by", "how", "why"):
        table.add_column(col, justify="right" if col in ("from", "to") else "left")
    for m in moves:
        table.add_row(_iso(m["time"]), f"@{m['alias']}",
                      f"v{m['from']}" if m["from"] is not None else "-", f"v{m['to']}", m["actor"],
                      m.get("kind", "-"), m["reason"])
    out.print(table)


def cmd_promote(args: argparse.Namespace) -> int:
    from orchestrator.registry import promote

    client = client_for(args)
    _model(client, args.name)
    result = promote(client, args.name, args.version, args.alias, args.force, args.reason)
    if args.json:
        print(json.dumps(result, default=str))
        return 0
    out = console()
    for g in result["gates"]:
        out.print(f"  {'pass' if g['passed'] else 'FAIL':<4}  {g['gate']:<14} {g['rule']}  (value {_value(g['value'])})")
    if result["moved"]:
        m = result["move"]
        came = f"from v{m['from']}" if m["from"] is not None else "(was unset)"
        out.print(f"{args.name}@{args.alias} -> v{args.version} {came}: {m['reason']}")
    else:
        out.print(f"{args.name}@{args.alias} already points at v{args.version}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from orchestrator.registry import rollback

    client = client_for(args)
    _model(client, args.name)
    move = rollback(client, args.name, args.alias, args.reason or "")
    if args.json:
        print(json.dumps(move))
        return 0
    console().print(f"{args.name}@{args.alias} -> v{move['to']} (back from v{move['from']}): {move['reason']}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """The MLflow UI on the embedded store (replaces this process, so Ctrl-C stops it)."""
    import shutil
    import sys

    if args.workflow:
        from orchestrator.spec import load_workflow
        from orchestrator.tracking import tracking_uri
        from orchestrator.workspace import storage_for

        spec = load_workflow(args.workflow)
        uri = tracking_uri(spec, storage_for(spec))
        if uri.startswith(("http://", "https://")):
            print(f"this workflow tracks to a server: open {uri}")
            return 0
    else:
        uri = default_tracking_uri(args)
    mlflow_bin = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or shutil.which("mlflow")
    if mlflow_bin is None:
        raise UserError("the mlflow command is not installed beside kdflow")
    # one worker and no job runner: a UI for one person's runs, light enough to start in seconds
    cmd = [mlflow_bin, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
           "--workers", "1"]
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    print(f"MLflow UI on {uri}: http://{args.host}:{args.port} (Ctrl-C stops it)", file=sys.stderr, flush=True)
    os.execv(mlflow_bin, cmd)
    return 0  # not reached


def add_parsers(sub: Any) -> None:
    """The registry subcommands of `kdflow` (cli.py wires them in)."""

    def where(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ROOT/mlflow.db)")
        sp.add_argument("--root", default=None, help="storage root of the embedded store (default .kdflow)")
        sp.add_argument("--json", action="store_true", help="one JSON document on stdout, for scripts")

    sp = sub.add_parser("models", help="registered models: list, show NAME, history NAME (alias moves)")
    sp.add_argument("action", choices=["list", "show", "history"])
    sp.add_argument("name", nargs="?")
    sp.add_argument("--version", type=int, default=None, help="show: whose gates and lineage to print "
                                                              "(default the latest)")
    where(sp)
    sp.set_defaults(fn=cmd_models)

    sp = sub.add_parser("promote", help="point an alias at a version if its recorded gates hold")
    sp.add_argument("name")
    sp.add_argument("--version", type=int, required=True)
    sp.add_argument("--alias", default="champion")
    sp.add_argument("--force", action="store_true", help="move the alias even if a gate fails (needs --reason)")
    sp.add_argument("--reason", default=None, help="why; recorded in the alias history")
    where(sp)
    sp.set_defaults(fn=cmd_promote)

    sp = sub.add_parser("rollback", help="point an alias back at the version that held it before")
    sp.add_argument("name")
    sp.add_argument("--alias", default="champion")
    sp.add_argument("--reason", default=None, help="why; recorded in the alias history")
    where(sp)
    sp.set_defaults(fn=cmd_rollback)

    sp = sub.add_parser("ui", help="start the MLflow UI on the embedded tracking store")
    sp.add_argument("--root", default=None, help="storage root (default .kdflow)")
    sp.add_argument("--workflow", default=None, help="take the tracking store from this workflow")
    sp.add_argument("--tracking-uri", default=None)
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=5000)
    sp.set_defaults(fn=cmd_ui)


# ---------------------------------------------------------------- the run's closing summary


def _secs(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def print_summary(out: Any, result: dict[str, Any]) -> None:
    """The closing summary of `kdflow run` in plain words and aligned numbers (the table is the kind's)."""
    from rich.table import Table

    from tasks.kinds import kind_for

    c = console(out)
    t, s, reg = result["teacher"], result["student"], result.get("registry") or {}
    c.print(f"[bold]{result['workflow']}[/]: {result['status']} in {_secs(result['seconds'])}")
    columns, rows = kind_for(result["task"]).summary_table(t, s)
    table = Table(box=None, show_header=True, pad_edge=False, padding=(0, 2))
    for col in columns:
        table.add_column(col, justify="left" if not col else "right")
    for row in rows:
        table.add_row(*row)
    c.print(table)
    rest_of_summary(c, result, s, reg)


def rest_of_summary(c: Any, result: dict[str, Any], s: dict[str, Any], reg: dict[str, Any]) -> None:
    from tasks.kinds import kind_for

    st = result["soft_targets"]
    c.print(f"soft targets  {'reused' if st['reused'] else 'computed'} {st['rows']:,} rows "
            f"({st['format']}/{st['dtype']}, {st['bytes']:,} bytes) at {st['uri']}")
    if result.get("search"):
        se = result["search"]
        c.print(f"search        study {se.get('study')}, best trial {se.get('best_trial')}")
        if se.get("wall_s") is not None:
            c.print(f"              {_secs(se['wall_s'])} of trials, {_secs(se['train_s'])} of it training steps "
                    f"over {se.get('concurrency') or 0} slot(s)"
                    + (f" (efficiency {se['efficiency']:.2f})" if se.get("efficiency") is not None else ""))
    rate = kind_for(result["task"]).rate(s)
    c.print(f"student       {s['epochs']} epochs ({s.get('stop_reason') or 'done'}), {rate}"
            + (f", resumed from {s['resumed_from']}" if s.get("resumed_from") else ""))
    stages = result.get("stages") or {}
    if stages:
        c.print("time          " + ", ".join(f"{k} {_secs(v)}" for k, v in stages.items()))
    if reg:
        aliases = " ".join(f"@{a}" for a in reg.get("aliases", [])) or "no alias"
        c.print(f"registered    {reg['model']} v{reg['version']} ({aliases})")
        failed = [g for g in (reg.get("gates") or {}).values() if not g["passed"]]
        if failed:
            from orchestrator.registry import failed_reason

            c.print(f"              not promoted: {failed_reason(failed)}")
        elif reg.get("gates"):
            c.print(f"              promoted: every gate holds ({', '.join(reg['gates'])})")
    ml = result["mlflow"]
    c.print(f"mlflow        run {ml['run_id']} in experiment {ml['experiment']!r}")
    uri = ml["tracking_uri"]
    if uri.startswith(("http://", "https://")):
        c.print(f"open the UI   {uri}")
    elif uri.startswith("sqlite:///"):
        root = Path(uri.removeprefix("sqlite:///")).parent
        here = Path(LOCAL_STATE_FOR_S3).resolve()
        c.print("open the UI   kdflow ui" + ("" if root == here else f" --root {root}"))
