"""Dataset names, ids and concurrent creation; whether a dataset can train an objective.

The races run in real processes (spawned, each with its own engine) on a fresh data folder.
"""
import multiprocessing
import os

import numpy as np
import pytest

from core.data import datasets
from core.data.datasets import check_trainable, ensure_builtin, resolve_dataset, save_dataset
from storage import queries
from storage.db import transaction
from storage.schema import Dataset


@pytest.fixture
def lab_home(any_home):
    """Every test here runs on SQLite and on PostgreSQL (conftest's any_home)."""
    return any_home


def _save(engine, name, n=6, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 255, size=(n, 8, 8, 1), dtype=np.uint8)
    labels = ["a" if i % 2 else "b" for i in range(n)]
    return save_dataset(engine, name, "upload", pixels, labels, [f"{i}.png" for i in range(n)],
                        [f"h{seed}-{i}" for i in range(n)])


def _names(engine):
    with transaction(engine) as session:
        return sorted(d.name for d in queries.list_datasets(session))


def _leftovers(lab_home):
    """Everything under datasets/ and tmp/ (a failed save must leave neither)."""
    return sorted(str(p.relative_to(lab_home)) for folder in ("datasets", "tmp") if (lab_home / folder).exists()
                  for p in (lab_home / folder).rglob("*"))


# --- names and ids ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["123", " 42 ", "007"])
def test_a_name_of_only_digits_is_refused(engine, lab_home, name):
    with pytest.raises(ValueError, match=r"^a dataset name cannot be only digits: numbers are dataset ids"):
        _save(engine, name)
    assert _names(engine) == [] and _leftovers(lab_home) == []
    _save(engine, "run 42")  # digits among other characters are a name
    assert _names(engine) == ["run 42"]


def test_names_longer_than_their_columns(engine, lab_home):
    """PostgreSQL refuses a string longer than its column, where SQLite kept it: a dataset name
    that long is a sentence; an image name that long (a deep path inside a zip) keeps its end."""
    with pytest.raises(ValueError, match=r"^a dataset name can have at most 200 characters; this one has 201$"):
        _save(engine, "x" * 201)
    assert _names(engine) == [] and _leftovers(lab_home) == []
    deep = "/".join(["folder"] * 100) + "/cat.png"
    pixels = np.zeros((2, 8, 8, 1), np.uint8)
    dataset_id = save_dataset(engine, "y" * 200, "zip", pixels, None, [deep, "dog.png"], ["h0", "h1"])
    with transaction(engine) as session:
        names = [image.name for image in queries.dataset_image_table(session, dataset_id)]
    assert len(deep) > 500 and len(names[0]) == 500
    assert names[0].startswith("…") and deep.endswith(names[0][1:]) and names[1] == "dog.png"


def test_a_digit_string_is_an_id_and_unknown_ids_say_so(engine):
    pets = _save(engine, "pets")
    assert resolve_dataset(engine, str(pets)).name == "pets"
    assert resolve_dataset(engine, pets).name == "pets"
    assert resolve_dataset(engine, "pets").id == pets
    with pytest.raises(LookupError, match=r"^no dataset with id 99; "):
        resolve_dataset(engine, "99")
    with pytest.raises(LookupError, match=r"^no dataset with id 98; "):
        resolve_dataset(engine, 98)
    with pytest.raises(LookupError, match=r"^no dataset named 'cats'; "):
        resolve_dataset(engine, "cats")


def test_a_legacy_digit_name_that_clashes_with_an_id_is_ambiguous(engine):
    first = _save(engine, "pets")
    second = _save(engine, "cars", seed=1)
    with transaction(engine) as session:  # as an older version could store it
        session.get(Dataset, second).name = str(first)
    with pytest.raises(ValueError, match=rf"^'{first}' is ambiguous: it is the id of dataset 'pets' and the name of "
                                         rf"dataset {second}; give {second} for the one named '{first}', or rename it$"):
        resolve_dataset(engine, str(first))
    assert resolve_dataset(engine, second).id == second  # the other one is still reachable by id
    with transaction(engine) as session:  # a digit name that is not also someone's id is simply found
        session.get(Dataset, second).name = "777"
    assert resolve_dataset(engine, "777").id == second


def test_a_zip_named_with_digits_gets_a_name_that_is_not_an_id(engine, tmp_path):
    import zipfile

    from PIL import Image

    from core.data.importing import import_paths

    archive = tmp_path / "2024.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, label in enumerate(["cats", "cats", "dogs"]):
            image = tmp_path / f"{i}.png"
            Image.fromarray(np.full((9, 9), 40 * i, np.uint8)).save(image)
            zf.write(image, f"{label}/{i}.png")
    report = import_paths(engine, [archive], image_size=16)
    assert report.name == "dataset-2024" and _names(engine) == ["dataset-2024"]


def test_images_outside_the_class_folders_are_named_and_nothing_is_stored(engine, lab_home):
    """Some images in class folders and some not: one sentence naming a loose image and a class
    folder it could go in, and no dataset."""
    import io
    import zipfile

    from PIL import Image

    from core.data.importing import import_uploads

    def png(level: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.full((9, 9), level, np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("pets/cats/0.png", png(10))
        zf.writestr("pets/dogs/1.png", png(20))
        zf.writestr("pets/readme-photo.png", png(30))
    with pytest.raises(ValueError, match=r"^some images have a class folder and some do not: "
                                         r"pets\.zip/pets/readme-photo\.png is in none, while pets\.zip/pets/cats/0\.png "
                                         r"is in the class folder pets\.zip/pets/cats/; put every image in a class folder$"):
        import_uploads(engine, "pets", [("pets.zip", archive.getvalue())], 16)
    with pytest.raises(ValueError, match=r": loose\.png is in none, while pets\.zip/cats/0\.png is in the class folder "
                                         r"pets\.zip/cats/;"):  # a loose file beside a zip of class folders
        two = io.BytesIO()
        with zipfile.ZipFile(two, "w") as zf:
            zf.writestr("cats/0.png", png(10))
            zf.writestr("dogs/1.png", png(20))
        import_uploads(engine, "pets", [("pets.zip", two.getvalue()), ("loose.png", png(30))], 16)
    assert _names(engine) == [] and _leftovers(lab_home) == []


# --- the database's unique name is the last word ----------------------------------------------

def test_the_unique_name_constraint_becomes_the_same_sentence_and_leaves_nothing(engine, lab_home, monkeypatch):
    _save(engine, "pets")
    before = _leftovers(lab_home)
    real = queries.dataset_by_name
    calls = []

    def misses_once(session, name):  # as if another process committed right after our check
        calls.append(name)
        return None if len(calls) == 1 else real(session, name)

    monkeypatch.setattr(queries, "dataset_by_name", misses_once)
    with pytest.raises(ValueError, match=r"^a dataset named 'pets' already exists; choose another name$"):
        _save(engine, "pets", seed=2)
    assert len(calls) == 2  # the pre-check was passed; the IntegrityError was translated
    monkeypatch.undo()
    assert _names(engine) == ["pets"] and _leftovers(lab_home) == before


def test_other_integrity_errors_are_not_disguised_as_a_taken_name(engine, lab_home):
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError):  # duplicate image hashes within one dataset
        save_dataset(engine, "broken", "upload", np.zeros((2, 8, 8, 1), np.uint8), None, ["x", "y"], ["same", "same"])
    assert _names(engine) == [] and _leftovers(lab_home) == []


def _racer(home, database, barrier, results, task):
    os.environ["EMBEDDING_LAB_HOME"] = home
    if database:
        os.environ["EMBEDDING_LAB_DB"] = database
    else:
        os.environ.pop("EMBEDDING_LAB_DB", None)
    from storage.db import make_engine

    engine = make_engine()
    barrier.wait(timeout=120)
    try:
        if task == "builtin":
            results.put(("ok", ensure_builtin(engine, "digits")))
        else:
            results.put(("ok", _save(engine, "pets", n=300, seed=os.getpid() % 1000)))
    except ValueError as exc:
        results.put(("ValueError", str(exc)))
    except BaseException as exc:  # anything else is a failure of the test
        results.put(("error", repr(exc)))


def _race(lab_home, task, processes=2):
    context = multiprocessing.get_context("spawn")  # a fresh interpreter each: no engine crosses a fork
    barrier, results = context.Barrier(processes), context.Queue()
    database = os.environ.get("EMBEDDING_LAB_DB")
    workers = [context.Process(target=_racer, args=(str(lab_home), database, barrier, results, task))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    return outcomes


def test_two_processes_importing_a_builtin_at_once_share_one_dataset(lab_home, engine):
    outcomes = _race(lab_home, "builtin")
    assert [kind for kind, _ in outcomes] == ["ok", "ok"], outcomes
    assert outcomes[0][1] == outcomes[1][1]  # both got the one dataset's id
    with transaction(engine) as session:
        stored = queries.list_datasets(session)
        assert [(d.id, d.name, d.n_images) for d in stored] == [(outcomes[0][1], "digits", 1797)]
    assert sorted(p.name for p in (lab_home / "datasets").iterdir()) == [str(outcomes[0][1])]
    assert not any((lab_home / "tmp").iterdir())


def test_two_processes_saving_one_name_at_once_one_wins(lab_home, engine):
    outcomes = _race(lab_home, "save")
    kinds = sorted(kind for kind, _ in outcomes)
    assert kinds == ["ValueError", "ok"], outcomes
    message = next(text for kind, text in outcomes if kind == "ValueError")
    assert message == "a dataset named 'pets' already exists; choose another name"
    winner = next(value for kind, value in outcomes if kind == "ok")
    assert _names(engine) == ["pets"]
    assert sorted(p.name for p in (lab_home / "datasets").iterdir()) == [str(winner)]
    assert not any((lab_home / "tmp").iterdir())


# --- can this dataset train this objective? ---------------------------------------------------

def test_a_supervised_objective_needs_two_classes_and_a_pair():
    with pytest.raises(ValueError, match=r"^dataset 'x' has one class \(cats\); a supervised objective needs at least "
                                         r"two: add images of another class, or choose InfoNCE to learn from two "
                                         r"augmented views of each image$"):
        check_trainable({0: 12}, supervised=True, dataset_name="x", classes=["cats"])
    with pytest.raises(ValueError, match=r"^dataset 'x' has 3 classes of one image each; .* add images to a class, "
                                         r"or choose InfoNCE"):
        check_trainable({0: 1, 1: 1, 2: 1}, supervised=True, dataset_name="x")
    with pytest.raises(ValueError, match=r"^the dataset has no labels; .* or choose InfoNCE"):
        check_trainable({None: 40}, supervised=True)
    with pytest.raises(ValueError, match=r"^dataset 'x' has 1 image; training needs at least two"):
        check_trainable({None: 1}, supervised=False, dataset_name="x")
    with pytest.raises(ValueError, match=r"has 0 images"):
        check_trainable({}, supervised=True, dataset_name="x")
    # the smallest sets that can train
    check_trainable({"cats": 2, "dogs": 1}, supervised=True)
    check_trainable({None: 2}, supervised=False)
    check_trainable({0: 12}, supervised=False)  # one class trains by views of each image


def test_check_trainable_takes_the_stored_class_counts(engine):
    dataset_id = _save(engine, "pets")
    with transaction(engine) as session:
        counts = queries.class_counts(session, dataset_id)
        dataset = session.get(Dataset, dataset_id)
        check_trainable(counts, supervised=True, dataset_name=dataset.name, classes=dataset.classes)
        only_b = {label: n for label, n in counts.items() if dataset.classes[label] == "b"}
    with pytest.raises(ValueError, match=r"^dataset 'pets' has one class \(b\)"):
        check_trainable(only_b, supervised=True, dataset_name="pets", classes=dataset.classes)


def test_image_rows_are_named_records_in_position_order(engine, lab_home):
    """The image table's rows carry their fields by name: position, name, label (an index into the
    dataset's classes, None when unlabeled) and split."""
    pixels = np.zeros((3, 8, 8, 1), np.uint8)
    split = np.array(["train", "test", "train"])
    labelled = save_dataset(engine, "named-rows", "upload", pixels, ["b", "a", "b"], ["x.png", "y.png", "z.png"],
                            ["n0", "n1", "n2"], split=split)
    unlabelled = save_dataset(engine, "named-rows-bare", "upload", pixels, None, ["p.png", "q.png", "r.png"],
                              ["u0", "u1", "u2"], split=split)
    with transaction(engine) as session:
        classes = session.get(Dataset, labelled).classes
        rows = queries.dataset_image_table(session, labelled)
        bare = queries.dataset_image_table(session, unlabelled)
    assert [row.position for row in rows] == [0, 1, 2]
    assert [row.name for row in rows] == ["x.png", "y.png", "z.png"]
    assert [classes[row.label] for row in rows] == ["b", "a", "b"]
    assert [row.split for row in rows] == ["train", "test", "train"]
    assert [row.label for row in bare] == [None, None, None] and bare[1].name == "q.png"
