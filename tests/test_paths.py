"""PathTable: a streamed dataset's paths in one buffer, read back exactly as the list they replace."""

import os
import pickle

import numpy as np
import pytest

from twist.data import PathTable, load_dataset
from twist.data.listing import list_tree

PATHS = ["/data/train/n01/a.JPEG", "/data/train/n01/b.jpg", "", "/données/été/ç.png",
         "/odd/caf\udce9.png", "/odd/\ud800lone.jpg", "relative/x.webp"]


def test_items_come_back_exactly_whatever_the_name():
    table = PathTable.of(PATHS)
    assert len(table) == len(PATHS)
    assert [table[i] for i in range(len(PATHS))] == PATHS  # undecodable bytes and lone surrogates included
    assert list(table) == PATHS and table == PATHS and PATHS == list(table)
    assert table[-1] == PATHS[-1] and table[np.int64(3)] == PATHS[3]
    with pytest.raises(IndexError):
        table[len(PATHS)]
    with pytest.raises(IndexError):
        table[-len(PATHS) - 1]


def test_slices_take_index_and_membership():
    table = PathTable.of(PATHS)
    assert table[1:5] == PATHS[1:5] and isinstance(table[1:5], PathTable)
    assert table[::-2] == PATHS[::-2]
    assert table.take([4, 0, 4]) == [PATHS[4], PATHS[0], PATHS[4]]
    assert table.index(PATHS[3]) == 3 and PATHS[5] in table and "/missing" not in table
    assert table != PATHS[:-1] and table != PATHS[::-1]


def test_empty_tables_and_one_empty_path():
    for empty in (PathTable(), PathTable.of([]), PathTable("", 0), PathTable.of(PATHS)[3:3]):
        assert len(empty) == 0 and list(empty) == [] and empty == []
    one = PathTable.of([""])
    assert len(one) == 1 and one[0] == "" and list(one) == [""]


def test_a_nul_in_a_path_is_refused():
    with pytest.raises(ValueError, match="NUL"):
        PathTable.of(["a\0b"])
    with pytest.raises(ValueError, match="expected 1"):
        PathTable("a\0b", 1)


def test_pickles_as_one_buffer_and_holds_no_object_per_path():
    table = PathTable.of(PATHS * 1000)
    again = pickle.loads(pickle.dumps(table))
    assert again == table and list(again) == PATHS * 1000
    encoded = sum(len(p.encode("utf-8", "surrogatepass")) + 1 for p in PATHS) * 1000
    assert table.nbytes() == encoded + 8 * (len(table) + 1)  # the bytes, a NUL and an offset per path


def test_a_folder_listing_and_its_dataset_hold_tables(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(tmp_path / c / f"{i}.jpg")
    listing = list_tree(str(tmp_path), frozenset({".jpg"}), str)
    assert isinstance(listing.paths, PathTable)
    assert list(listing.paths) == [os.path.join(tmp_path, c, f"{i}.jpg") for c in ("cat", "dog") for i in range(3)]
    streamed = load_dataset(str(tmp_path), "train", image_size=32, max_memory_gb=1e-9, progress=False)
    held = load_dataset(str(tmp_path), "train", image_size=32, progress=False)
    assert not streamed.in_memory and held.in_memory
    assert isinstance(streamed.paths, PathTable) and isinstance(held.paths, PathTable)
    assert streamed.paths == held.paths == listing.paths


def test_chunks_give_the_table_of_their_paths():
    chunks = ["\0".join(PATHS[:2]), PATHS[3], "\0".join(PATHS[4:])]
    table = PathTable.from_chunks(chunks)
    assert table == PATHS[:2] + PATHS[3:] and table == PathTable.of(PATHS[:2] + PATHS[3:])
    assert PathTable.from_chunks([]) == [] and PathTable.from_chunks(["a"]) == ["a"]


def _private_dirty_mb() -> float:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Private_Dirty:")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux's /proc/PID/smaps_rollup")
def test_a_forked_reader_does_not_copy_the_table():
    """What DataLoader workers do: read every path of a table inherited through fork. A list of
    str would grow the child by about 100 bytes per path (each read writes the string's reference
    count, so its page is copied): 10 MB here; the table's buffer is only read."""
    table = PathTable.of(f"/data/train/n{i // 1000:05d}/image_{i:08d}.JPEG" for i in range(100_000))
    order = np.random.default_rng(0).permutation(len(table))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its growth, never return into pytest
        try:
            before = _private_dirty_mb()
            for i in order:
                table[i]
            os.write(write, str(_private_dirty_mb() - before).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    grown = float(os.read(read, 64).decode())
    assert grown < 2.0, f"a forked reader of 100,000 paths grew by {grown:.1f} MB"
