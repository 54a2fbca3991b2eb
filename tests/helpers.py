"""What several test modules do the same way: wait for a stored state or a worker's exit, stop a
run mid-way."""
import os
import time

from storage.db import transaction
from storage.schema import Run


def wait_for(engine, row_id, predicate, timeout=180, table=Run):
    """Poll the row until `predicate(row)` holds; the row, or AssertionError with its last state."""
    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline:
        with transaction(engine) as session:
            row = session.get(table, row_id)
            if predicate(row):
                return row
        time.sleep(0.05)
    raise AssertionError(f"{table.__name__} {row_id} never reached the expected state; last: "
                         f"{row and row.status} {row and row.reason}")


def reap(pid: int, timeout: float = 60) -> int:
    """Wait for a child worker to exit; its exit status. Reaped, not probed with kill(pid, 0): an
    exited child of this process stays a zombie that kill still finds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not exit")


def digits_store(tmp_path_factory, epochs: int):
    """For a module-scoped fixture: one data folder with one completed digits run; yields
    (engine, run id) and disposes of the engine afterwards."""
    import pytest

    from storage.db import make_engine

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBEDDING_LAB_HOME", str(tmp_path_factory.mktemp("lab")))
        patch.delenv("EMBEDDING_LAB_DB", raising=False)
        engine = make_engine()
        yield engine, completed_digits_run(engine, epochs)
        engine.dispose()


def completed_digits_run(engine, epochs: int = 1, loss: str = "triplet") -> int:
    """A digits run trained to completion in this process (no map job); its id. Triplet loss unless
    told: what most page tests read is the triplet inspector's categories (RunConfig's default is supcon)."""
    from core.training.config import RunConfig
    from core.runs.jobs import create_training_run
    from core.runs.worker import execute_run

    run_id = create_training_run(engine, RunConfig(dataset="digits", loss=loss, epochs=epochs, batch_size=128))
    assert execute_run(engine, run_id, project=False)["status"] == "completed"
    return run_id


def cancelled_in_epoch_two(engine) -> int:
    """A two-epoch digits run stopped in its second epoch, in this process: cancelled, with a
    checkpoint after epoch 1 to resume from. Returns its id."""
    from core.training.config import RunConfig
    from core.runs.jobs import create_training_run
    from core.training.loop import Cancelled
    from core.runs.worker import execute_run

    run_id = create_training_run(engine, RunConfig(dataset="digits", loss="triplet", epochs=2, batch_size=128))

    def stop_in_epoch_two(progress):
        if progress.epoch == 2:
            raise Cancelled()

    assert execute_run(engine, run_id, on_step=stop_in_epoch_two, project=False)["status"] == "cancelled"
    return run_id


def clustered_run(engine, n: int, classes: int = 10, dim: int = 32, side: int = 12, seed: int = 0,
                  test_fraction: float = 1 / 7, umap: bool = True) -> dict:
    """A completed run made without training: a dataset of `n` small generated images (a class's
    own grey level and stripe, with noise), embeddings clustered by class, and, when `umap`, a
    stored "UMAP" map (the class centres in 2-d plus spread). Returns ids and arrays."""
    import numpy as np

    from core.data.datasets import save_dataset
    from core.runs.jobs import queue_projection
    from core.explore.projection import UMAP_DEFAULTS
    from storage import artifacts
    from storage.run_files import RunFiles
    from storage.schema import utcnow

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, dim)) * 1.5
    embeddings = (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32)
    pixels = rng.integers(0, 40, (n, side, side, 1), dtype=np.uint8)
    level = (60 + 190 * labels / max(1, classes - 1)).astype(np.uint8)
    pixels[:, :, :, 0] += level[:, None, None] // 2
    rows = (labels * 3) % side
    pixels[np.arange(n), rows, :, 0] = 255
    split = np.where(rng.random(n) < test_fraction, "test", "train")
    names = [f"img-{i:06d}.png" for i in range(n)]
    dataset_id = save_dataset(engine, f"clustered-{n}-{seed}", "upload", pixels, labels,
                              names, [f"h{seed}-{i}" for i in range(n)],
                              classes=[f"class {c}" for c in range(classes)], split=split)
    with transaction(engine) as session:
        run = Run(dataset_id=dataset_id, kind="embed", config={"encoder": "stored"}, status="completed",
                  finished_at=utcnow())
        session.add(run)
        session.flush()
        run_id = run.id
        run.embeddings = RunFiles(run_id).relative("embeddings.npy")  # the name earlier versions gave
    RunFiles(run_id).make()
    np.save(artifacts.absolute(run.embeddings), embeddings)
    coords = None
    if umap:
        layout = rng.normal(size=(classes, 2)) * 8
        coords = (layout[labels] + rng.normal(size=(n, 2))).astype(np.float32)
        relative = RunFiles(run_id).umap("stored")
        np.save(artifacts.absolute(relative), coords)
        with transaction(engine) as session:
            row, _ = queue_projection(session, run_id, dict(UMAP_DEFAULTS))
            row.status, row.path, row.finished_at = "done", relative, utcnow()
    return {"run_id": run_id, "dataset_id": dataset_id, "labels": labels, "embeddings": embeddings,
            "split": split, "coords": coords, "pixels": pixels}


def stored_run(engine, dataset_id: int, embeddings, config: dict | None = None, statistics: bool = True) -> int:
    """A completed embedding run of `dataset_id` made without training: `embeddings` (one row per
    image) stored as a run's are, through the lifecycle (created, claimed, completed); with its
    statistics computed in this process when `statistics`. Returns its id."""
    import numpy as np

    from core.runs import lifecycle
    from core.runs.worker import compute_statistics
    from storage import artifacts
    from storage.run_files import RunFiles

    with transaction(engine) as session:
        run_id = lifecycle.create(session, Run(dataset_id=dataset_id, kind="embed",
                                               config=dict(config or {"encoder": "stored"}))).id
    holder = lifecycle.claim(engine, Run, run_id)
    relative = RunFiles(run_id).embeddings_of(holder.owner)
    RunFiles(run_id).make()
    artifacts.save_array_atomic(artifacts.absolute(relative), np.ascontiguousarray(embeddings, dtype=np.float32))
    with transaction(engine) as session:
        lifecycle.complete(session, holder, embeddings=relative)
    if statistics:
        assert compute_statistics(engine, run_id).status == "done"
    return run_id


# ---------------------------------------------------------------- the Explore map in a browser


def map_frame(page):
    """The map component's frame once its points are drawn."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        frame = next((f for f in page.frames if "embedding_map" in f.url), None)
        if frame is not None:
            try:
                if frame.evaluate("() => window.__map && window.__map.ready"):
                    return frame
            except Exception:  # the frame was replaced by a rerun
                pass
        page.wait_for_timeout(250)  # (time.sleep would not let Playwright hear of the new frame)
    raise AssertionError("the map never finished drawing")


def point_on_page(page, frame, i: int) -> tuple[float, float]:
    x, y = frame.evaluate(f"() => window.__map.getScreenPosition({i})")
    box = frame.locator("#canvas").bounding_box()
    return box["x"] + x, box["y"] + y


def view_of_points(frame) -> dict:
    """Where the map's points lie on its canvas: their screen box (left, top, right, bottom, in
    the canvas's pixels) and the canvas's width and height."""
    return frame.evaluate("""() => {
        const canvas = document.getElementById('canvas');
        let [left, top, right, bottom] = [Infinity, Infinity, -Infinity, -Infinity];
        for (let i = 0; i < window.__map.points; i += 1) {
            const [x, y] = window.__map.getScreenPosition(i);
            left = Math.min(left, x); right = Math.max(right, x); top = Math.min(top, y); bottom = Math.max(bottom, y);
        }
        return { left, top, right, bottom, width: canvas.clientWidth, height: canvas.clientHeight };
    }""")


def assert_fits_every_point(frame, margin: float = 8) -> None:
    """Every point of the map in view, at least `margin` px inside its edges, and the points filling
    most of the side that binds (a view fitted to them, not merely zoomed out)."""
    view = view_of_points(frame)
    inside = (view["left"] >= margin and view["top"] >= margin
              and view["right"] <= view["width"] - margin and view["bottom"] <= view["height"] - margin)
    fill = max((view["right"] - view["left"]) / view["width"], (view["bottom"] - view["top"]) / view["height"])
    assert inside and fill >= 0.8, view


def share_in_own_colours(frame, points: list[int], labels) -> float:
    """Of these points of a map coloured by label (legend entry c is class c), the share whose
    pixel at their centre on the canvas has their class's legend colour: a selected point is
    drawn on top of the others, in its own colour."""
    return frame.evaluate("""async ([points, labels]) => {
        await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));  // drawn
        const canvas = document.getElementById('canvas');
        const context = canvas.getContext('2d');
        const scale = canvas.width / canvas.clientWidth;
        const swatch = {};
        document.querySelectorAll('#legend button.entry').forEach((entry) => {
            swatch[entry.dataset.entry] = getComputedStyle(entry.querySelector('.swatch')).backgroundColor
                .match(/\\d+/g).slice(0, 3).map(Number);
        });
        let same = 0;
        points.forEach((i, k) => {
            const [x, y] = window.__map.getScreenPosition(i);
            const pixel = context.getImageData(Math.floor(x * scale), Math.floor(y * scale), 1, 1).data;
            const colour = swatch[labels[k]];
            if (colour && [0, 1, 2].every((j) => Math.abs(pixel[j] - colour[j]) <= 24)) same += 1;
        });
        return points.length ? same / points.length : 0;
    }""", [list(map(int, points)), [int(labels[i]) for i in points]])


def selected_points(frame) -> list[int]:
    return frame.evaluate("() => Array.from(window.__map.selected())")


def canvas_top(frame) -> float:
    """The canvas's top within the map's own frame (the page may scroll meanwhile)."""
    return frame.evaluate("() => document.getElementById('canvas').getBoundingClientRect().top")
