"""``fss`` — the one command line of the pipeline.

Every stage is runnable alone; ``fss run`` runs the whole flow, ``fss demo`` runs it on
synthetic data. Heavy libraries are imported inside commands so that ``--help`` is fast.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from fss_cli.errors import Interrupted, OneLineErrors, debugging, hide_tracebacks_in_terminal_logs, quiet_local_workers
from fss_cli.process import console_process, hangup_and_term_interrupt, heavy_imports, start_temporary_prefect_server

# Prefect reads these at import time: keep its state out of the user's home by default,
# and send nothing to the network.
os.environ.setdefault("PREFECT_HOME", str(Path.home() / ".fss" / "prefect"))
Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)  # Prefect does not create it
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The first start of the local (ephemeral) server migrates its database; on a busy machine that
# takes longer than Prefect's default 20 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# MLflow draws a progress bar for every artifact download (registering a model makes several),
# between the run's log lines; the run's own bars show its progress.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# configs/demo.yaml, installed with the package (fss_cli/demo.yaml links to it in the repository)
DEMO_CONFIG = Path(__file__).with_name("demo.yaml")

app = typer.Typer(help="Label-free few-shot semantic segmentation pipeline.", no_args_is_help=True,
                  pretty_exceptions_enable=False, cls=OneLineErrors)
data_app = typer.Typer(help="Datasets: synthetic data.", no_args_is_help=True)
prepare_app = typer.Typer(help="Prepare real datasets: SBD/VOC aug labels, COCO masks, lists.",
                          no_args_is_help=True)
config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(prepare_app, name="prepare")
app.add_typer(config_app, name="config")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override: section.key=value.")]
WorkspaceOpt = Annotated[Optional[Path], typer.Option("--workspace", "-w", help="Workspace folder.")]


NOISY_LOGGERS = ("httpx", "httpcore", "distributed", "alembic", "urllib3", "mlflow")


def _setup_logging(verbose: bool | None = None) -> None:
    """INFO logging to the terminal; ``verbose`` (default: ``FSS_DEBUG`` set) is DEBUG with
    every library's messages."""
    verbose = debugging() if verbose is None else verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:  # one line per HTTP request or Dask connection buries the progress bars
        for chatty in NOISY_LOGGERS:
            logging.getLogger(chatty).setLevel(logging.WARNING)
        # distributed sets its own level when imported (here and in every worker): tell it by config
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    if not debugging():
        hide_tracebacks_in_terminal_logs()


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _config(config: Path | None, overrides: list[str] | None, workspace: Path | None = None,
            default: Path | None = None):
    from fss_core.config import ConfigError, load_config

    sets = list(overrides or [])
    if workspace is not None:
        sets.append(f"runtime.workspace={workspace}")
    try:
        return load_config(config if config is not None else default, sets)
    except ConfigError as exc:
        _fail(str(exc))


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved configuration as YAML."""
    typer.echo(_config(config, set_).to_yaml())


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Output dataset root (VOC layout).")],
    seed: int = 0,
    classes: int = 20,
    images: int = 480,
    size: int = 128,
) -> None:
    """Write a synthetic VOC-layout dataset (JPEGImages, SegmentationClassAug, lists)."""
    from fss_core.data.synthetic import synthesize

    _setup_logging()
    try:
        summary = synthesize(out, seed=seed, classes=classes, images=images, size=size)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(f"wrote {summary.images} images of {summary.classes} classes to {out}")


@app.command()
def ingest(
    source: Annotated[Optional[Path], typer.Argument(help="Dataset root or image folder.")] = None,
    layout: Annotated[str, typer.Option(help="auto | folder | voc | coco")] = "auto",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Build or update the workspace manifest of a source (only new or changed files are read)."""
    _setup_logging()
    extra = list(set_ or [])
    if source is not None:
        extra += [f"data.source={source.resolve()}", f"data.layout={layout}"]
    cfg = _config(config, extra, workspace)
    from tasks.ingest import run_ingest
    from tasks.workspace import workspace_lock, workspace_of

    with workspace_lock(workspace_of(cfg).root, what="fss ingest"):
        result = run_ingest(cfg)
    typer.echo(f"manifest: {result.total} images, {result.ok} ok, {result.skipped} skipped, "
               f"{result.added} added, {result.changed} changed, {result.removed} removed")
    if result.ok == 0:
        _fail(f"no readable image in the source ({result.skipped} skipped; the manifest "
              f"{workspace_of(cfg).manifest} gives each reason)")


@prepare_app.command("sbd")
def prepare_sbd_cmd(
    sbd_root: Annotated[Path, typer.Option(help="SBD root holding cls/*.mat")],
    voc_root: Annotated[Path, typer.Option(help="VOC2012 root holding SegmentationClass/")],
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default VOC/SegmentationClassAug)")] = None,
) -> None:
    """SBD .mat + VOC SegmentationClass → SegmentationClassAug PNGs."""
    from fss_core.data.prepare import prepare_sbd

    _setup_logging()
    typer.echo(prepare_sbd(sbd_root, voc_root, out).summary())


@prepare_app.command("coco")
def prepare_coco_cmd(
    coco_root: Annotated[Path, typer.Option(help="COCO 2014 root with annotations/instances_*.json")],
    split: Annotated[str, typer.Option(help="train | val")] = "train",
    overwrite: bool = False,
) -> None:
    """COCO instances json → semantic PNGs (ids 1..80 in category order, crowd skipped; none for an
    image without annotations, so the lists leave it out)."""
    from fss_core.data.prepare import prepare_coco

    _setup_logging()
    typer.echo(prepare_coco(coco_root, split, overwrite=overwrite).summary())


@prepare_app.command("lists")
def prepare_lists_cmd(
    root: Annotated[Path, typer.Option(help="Dataset root (VOC or COCO layout).")],
    out: Annotated[Path, typer.Option(help="Folder for the lists.")],
    scheme: Annotated[Optional[str], typer.Option(
        help="pascal | coco | coco_consecutive | generic (default: coco for a COCO-layout root, else pascal)")] = None,
    layout: Annotated[str, typer.Option(help="auto | voc | coco")] = "auto",
    seed: int = 0,
    min_area: int = 2048,
    num_classes: Annotated[Optional[int], typer.Option(help="classes of a generic dataset")] = None,
) -> None:
    """Train/val lists, per-fold lists and seeded nested 5/10/20 % label-fraction subsets.

    Label ids above the scheme's classes are an error: the scheme does not fit the dataset."""
    from fss_core.data.prepare import default_scheme, prepare_lists

    _setup_logging()
    if scheme is None:
        scheme = default_scheme(root, layout)
        typer.echo(f"scheme: {scheme} (from the dataset layout; --scheme to choose another)")
    typer.echo(prepare_lists(root, layout, out, scheme=scheme, seed=seed, min_area=min_area,
                             num_classes=num_classes).summary())


def _run_pipeline(cfg, dask_address: str | None, until: str = "register") -> dict:
    from tasks.workspace import workspace_lock, workspace_of

    # Taken before Prefect starts, so a busy workspace fails at once; the flow re-enters it.
    with hangup_and_term_interrupt(), workspace_lock(workspace_of(cfg).root, what=f"fss (until {until})"):
        if not debugging():
            quiet_local_workers()
        with heavy_imports():
            if not (dask_address or cfg.runtime.dask_address):
                from flows.dask_runtime import start_worker_forkserver

                start_worker_forkserver()  # its imports overlap with the flow's, on another core
            server = start_temporary_prefect_server()  # so does its start, where the flow needs one
            from flows.pipeline import pipeline

        if not debugging():
            hide_tracebacks_in_terminal_logs()  # Prefect installs its console handlers on import
        if server is not None:
            server.join()
        try:
            return pipeline(config=cfg.model_dump(mode="json"), dask_address=dask_address, until=until)
        except KeyboardInterrupt:
            raise Interrupted("what was done is kept in the workspace; the same command resumes from there") from None


def _stage_command(until: str, doc: str):
    def command(
        config: ConfigOpt = None,
        set_: SetOpt = None,
        workspace: WorkspaceOpt = None,
        dask_address: Annotated[Optional[str], typer.Option(help="Existing Dask scheduler")] = None,
    ) -> None:
        _setup_logging()
        cfg = _config(config, set_, workspace)
        results = _run_pipeline(cfg, dask_address, until=until)
        from fss_cli.report import print_summary

        print_summary(cfg, results)

    command.__doc__ = doc
    return command


for _name, _until, _doc in (
    ("extract", "extract", "Pixel embeddings of every training image into embeddings.zarr (resumable)."),
    ("cluster", "cluster", "Dask k-means of the embeddings into pseudo-classes (clusters.zarr)."),
    ("pseudo", "pseudo", "Pseudo masks (one PNG per image) and their quality report."),
    ("train", "train", "Everything up to a trained FSS model (mode from train.mode)."),
):
    app.command(_name)(_stage_command(_until, _doc))


@app.command()
def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workspace: WorkspaceOpt = None,
    dask_address: Annotated[Optional[str], typer.Option(help="Existing Dask scheduler, tcp://host:8786")] = None,
) -> None:
    """Run the whole pipeline flow on the configured dataset into the workspace; print each stage's
    summary and the evaluation's comparison table."""
    _setup_logging()
    cfg = _config(config, set_, workspace)
    results = _run_pipeline(cfg, dask_address)
    from fss_cli.report import print_summary

    print_summary(cfg, results)
    typer.echo(f"pipeline finished: {', '.join(results)}")


@app.command()
def demo(
    set_: SetOpt = None,
    workspace: Annotated[Path, typer.Option("--workspace", "-w")] = Path("demo-workspace"),
    dask_address: Annotated[Optional[str], typer.Option(help="Existing Dask scheduler")] = None,
) -> None:
    """Synthetic data → the whole pipeline → a summary table. A second run is a cached no-op."""
    _setup_logging()
    cfg = _config(None, set_, workspace, default=DEMO_CONFIG)
    results = _run_pipeline(cfg, dask_address)
    from fss_cli.report import print_summary

    print_summary(cfg, results)


@app.command()
def evaluate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workspace: WorkspaceOpt = None,
    bundle: Annotated[Optional[Path], typer.Option(help="A trained model bundle; none = the pipeline's model")] = None,
    baseline: Annotated[bool, typer.Option(help="Evaluate the training-free prototype baseline instead")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Output folder for metrics.json and episodes")] = None,
    save_predictions: Annotated[Optional[Path], typer.Option(
        "--save-predictions", metavar="DIR",
        help="Also write every episode's prediction as a PNG (0 = bg, 1 = fg, at the original label "
             "size): DIR/fold{f}/{s}shot/seed{n}/{episode:05d}.png, the episode index being the one in "
             "OUT/fold{f}/{s}shot/seed{n}/episodes.jsonl. Needs --bundle or --baseline.")] = None,
    overlays: Annotated[int, typer.Option(help="Overlay pictures for the first N episodes")] = 0,
    dask_address: Annotated[Optional[str], typer.Option(help="Existing Dask scheduler")] = None,
) -> None:
    """The few-shot protocol: every evaluate.folds × evaluate.shots, mean ± std over evaluate.seeds.

    Without --bundle/--baseline it runs the pipeline up to evaluation (its comparison table).
    With them it evaluates that model on the configured dataset's val split directly: OUT
    (default ./evaluation) receives fold{f}/{s}shot/metrics.json and, per seed,
    fold{f}/{s}shot/seed{n}/{episodes.jsonl, metrics.json}.
    """
    _setup_logging()
    cfg = _config(config, set_, workspace)
    if bundle is None and not baseline:
        if save_predictions is not None or overlays:
            _fail("--save-predictions and --overlays need --bundle or --baseline; the pipeline's evaluation "
                  "writes overlays as set by evaluate.overlays")
        results = _run_pipeline(cfg, dask_address, until="evaluate")
        typer.echo(results["evaluate"].table)
        return
    with heavy_imports():
        from fss_cli.standalone import evaluate_standalone

    typer.echo(evaluate_standalone(cfg, bundle, out or Path("evaluation"), save_predictions, overlays))


@app.command()
def predict(
    bundle: Annotated[Path, typer.Option(help="Trained model bundle (model.json + weights.pt)")],
    support: Annotated[list[str], typer.Option(help="IMAGE:MASK, repeat for several shots")],
    query: Annotated[list[Path], typer.Option(help="Query image, or a folder of them (more may follow as arguments)")],
    more_queries: Annotated[Optional[list[Path]], typer.Argument(help="More query images or folders")] = None,
    out: Annotated[Path, typer.Option(help="Output folder for the masks")] = Path("predictions"),
    device: str = "cpu",
) -> None:
    """Segment, in new images, the class the support masks show (masks: nonzero = foreground)."""
    with heavy_imports():
        from fss_core.inference.predict import PredictInputError, predict as run_predict, save_masks
        from fss_core.models.fss.bundle import load_bundle

    _setup_logging()
    pairs = []
    for item in support:
        image, sep, mask = item.rpartition(":")
        if not sep or not image:
            _fail(f"--support {item!r} must be IMAGE:MASK")
        pairs.append((Path(image), Path(mask)))
    queries = [image for q in [*query, *(more_queries or [])] for image in _query_images(q)]
    if out.exists() and not out.is_dir():
        _fail(f"--out {out} is a file; the masks go into a folder (created if missing)")
    names = [q.stem for q in queries]  # each query's mask is OUT/{stem}.png
    clashes = sorted({str(q) for q in queries if names.count(q.stem) > 1})
    if clashes:
        _fail(f"queries {', '.join(clashes)} would write the same mask files in {out} (one per file name "
              "without its extension): rename them or predict them in separate runs")
    try:
        model, spec = load_bundle(bundle)
        masks = run_predict(model, pairs, queries, image_size=spec.image_size, device=device)
    except (PredictInputError, FileNotFoundError) as exc:
        _fail(str(exc))
    try:
        paths = save_masks(masks, names, out)
    except PredictInputError as exc:
        _fail(str(exc))
    except OSError as exc:  # the output folder: not writable, disk full
        _fail(f"cannot write the masks to {out}: {exc.strerror or exc}")
    for q, p in zip(queries, paths):
        typer.echo(f"{q} -> {p}")


def _query_images(path: Path) -> list[Path]:
    """A query argument: an image file, or a folder standing for the images directly in it."""
    if not path.is_dir():
        return [path]
    from fss_core.data.images import IMAGE_SUFFIXES

    images = sorted(p for p in path.iterdir()
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not images:
        _fail(f"--query {path} is a folder with no image in it ({', '.join(IMAGE_SUFFIXES)})")
    return images


@app.command()
def ui(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workspace: WorkspaceOpt = None,
    mlflow_port: int = 5000,
    prefect_port: int = 4200,
    host: Annotated[str, typer.Option(help="Interface both servers listen on; 0.0.0.0 exposes them to "
                                           "the network (they have no authentication; set "
                                           "PREFECT_UI_API_URL to the API address browsers reach)")] = "127.0.0.1",
) -> None:
    """Start the MLflow UI (on the workspace's store) and the Prefect server, on 127.0.0.1 unless --host.

    Ctrl-C or SIGTERM stops both. If one exits by itself (its port in use, say), so does the other, with an error."""
    import subprocess

    cfg = _config(config, set_, workspace)
    from tasks.tracking import tracking_uri

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # `--port` alone moves the API but not the address the Prefect UI calls it at (127.0.0.1:4200,
    # or PREFECT_API_URL): the server's own settings set both.
    url_host = f"[{host}]" if ":" in host else host
    prefect_env = {**env, "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(prefect_port),
                   "PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL")
                   or f"http://{url_host}:{prefect_port}/api"}
    servers = [
        ("MLflow server", mlflow_port, [str(bin_dir / "mlflow"), "server", "--backend-store-uri", tracking_uri(cfg),
                                        "--host", host, "--port", str(mlflow_port), "--workers", "1"], env),
        ("Prefect server", prefect_port, [str(bin_dir / "prefect"), "server", "start", "--host", host,
                                          "--port", str(prefect_port)], prefect_env),
    ]
    procs: list[subprocess.Popen] = []
    exited = None
    with hangup_and_term_interrupt():  # SIGTERM (and a closed terminal) stop the servers as Ctrl-C does
        try:
            for _, _, command, server_env in servers:
                procs.append(subprocess.Popen(command, env=server_env))
            typer.echo(f"MLflow UI:  http://{url_host}:{mlflow_port}\nPrefect UI: http://{url_host}:{prefect_port}\n"
                       "Ctrl-C stops both.")
            exited = _wait_for_an_exit(procs)
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP
            pass
        finally:
            _stop_servers(procs)
    if exited is not None:
        name, port = servers[exited][:2]
        others = " and ".join(other[0] for i, other in enumerate(servers) if i != exited)
        typer.secho(f"error: the {name} on port {port} exited with code {procs[exited].returncode} (its output "
                    f"above says why: the port in use?); stopped the {others}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def _wait_for_an_exit(procs) -> int:
    """Wait until one of the processes ``procs`` exits; returns its index."""
    import time

    while True:
        for i, proc in enumerate(procs):
            if proc.poll() is not None:
                return i
        time.sleep(0.5)


def _stop_servers(procs) -> None:
    """Terminate the processes ``procs`` and wait for them; kill one that takes over 30 s."""
    import subprocess

    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@app.command("serve")
def serve_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    dask_address: Annotated[Optional[str], typer.Option(help="Dask scheduler for served runs")] = None,
    mlflow_tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI for served runs")] = None,
    retrain_cron: Annotated[str, typer.Option(help="Cron schedule of the retrain deployment")] = "0 2 * * *",
) -> None:
    """Serve the deployments (pipeline: manual runs; retrain: cron) against PREFECT_API_URL."""
    _setup_logging()
    with heavy_imports():
        from prefect.settings import PREFECT_API_URL

    # Without a server address Prefect would serve against a private temporary server, whose
    # scheduler is off (the cron retrain never runs) and which no UI shows.
    if not PREFECT_API_URL.value():
        _fail("fss serve needs a Prefect server: start one (`fss ui` or `prefect server start`) and "
              "export PREFECT_API_URL=http://127.0.0.1:4200/api, or the address of yours")
    overrides = list(set_ or [])
    if mlflow_tracking_uri:
        overrides.append(f"runtime.mlflow_tracking_uri={mlflow_tracking_uri}")
    _config(config, overrides)  # fail now, not at the first triggered run
    with heavy_imports():
        from flows.deploy import serve_deployments

    serve_deployments(config_path=str(config.resolve()) if config else None, overrides=overrides,
                      dask_address=dask_address, retrain_cron=retrain_cron)


def main() -> None:  # pragma: no cover - console entry point
    console_process()
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
