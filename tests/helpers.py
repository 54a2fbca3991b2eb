"""What several test modules do the same way: wait for a stored state, stop a run mid-way."""
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


def cancelled_in_epoch_two(engine) -> int:
    """A two-epoch digits run stopped in its second epoch, in this process: cancelled, with a
    checkpoint after epoch 1 to resume from. Returns its id."""
    from core.config import RunConfig
    from core.jobs import create_training_run
    from core.training import Cancelled
    from core.worker import execute_run

    run_id = create_training_run(engine, RunConfig(dataset="digits", epochs=2, batch_size=128))

    def stop_in_epoch_two(progress):
        if progress.epoch == 2:
            raise Cancelled()

    assert execute_run(engine, run_id, on_step=stop_in_epoch_two, project=False)["status"] == "cancelled"
    return run_id
