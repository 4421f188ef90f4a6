"""Nothing read back is trusted blindly (issue 22, items 7 and 9-12): the cache, safetensors headers,
shard indexes and JSON nesting. Each test builds the hostile file and checks the one-line answer."""

import json
import os
import stat
import struct

import pytest
import torch
from conftest import heavy_tailed
from safetensors.torch import save_file

from farms_lightning.cli.commands import main
from farms_lightning.files.safetensors_file import MAX_TENSORS, SafetensorsFile

DEEP = "[" * 1000 + "]" * 1000  # deeper than Python's parser can recurse


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def write_safetensors(path, header, data=b""):
    """A safetensors file with exactly this header (a dict, or raw JSON bytes) and data bytes."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def f32(shape, begin):
    count = 1
    for n in shape:
        count *= n
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + 4 * count]}


# ---------------------------------------------------------------- item 7: the cache

@pytest.fixture
def cached(tmp_path, capsys):
    """A model of three matrices analysed once with ``--cache``: (model, cache folder, report)."""
    model = tmp_path / "m.safetensors"
    save_file({"a.weight": heavy_tailed(120, 80, seed=1), "b.weight": heavy_tailed(100, 90, seed=2),
               "c.weight": heavy_tailed(90, 60, seed=3)}, model)
    cache = tmp_path / "cache"
    code, out, _ = run(["analyze", model, "--cache", cache, "--format", "json"], capsys)
    assert code == 0
    return model, cache, json.loads(out)


def rerun(cached, capsys):
    model, cache, _ = cached
    code, out, err = run(["analyze", model, "--cache", cache, "--format", "json"], capsys)
    assert code == 0
    return json.loads(out), err


def entries(cache):
    return sorted(cache.iterdir())


def entry_of(cache, name_alpha):
    """The entry whose alpha is ``name_alpha`` (entries do not hold layer names)."""
    for path in entries(cache):
        if json.loads(path.read_text())["alpha"] == name_alpha:
            return path
    raise AssertionError("no such entry")


def test_a_clean_cache_is_used_without_warnings(cached, capsys):
    report, err = rerun(cached, capsys)
    assert report["summary"] == cached[2]["summary"] and "warning" not in err and "3 of 3 matrices" in err


def test_fresh_cache_folder_is_private_whatever_the_umask(cached, tmp_path, capsys):
    old = os.umask(0o002)
    try:
        model, _, _ = cached
        cache = tmp_path / "umask-cache"
        assert run(["analyze", model, "--cache", cache], capsys)[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in entries(cache)} == {0o600}


@pytest.mark.parametrize("alpha", [9.99, "2.5", [2.5], None, float("inf"), 0.5])
def test_an_edited_entry_is_a_miss_with_a_warning(cached, capsys, alpha):
    _, cache, first = cached
    victim = entry_of(cache, first["layers"][0]["alpha"])
    data = json.loads(victim.read_text())
    data["alpha"] = alpha
    victim.write_text(json.dumps(data))  # json writes inf as Infinity: not JSON, refused as well
    report, err = rerun(cached, capsys)
    assert report["summary"]["alpha_mean"] == first["summary"]["alpha_mean"]  # recomputed, not 9.99
    assert err.count("warning") == 1 and victim.name in err and "analysing again" in err
    assert "2 of 3 matrices not analysed again" in err


def test_an_entry_with_a_consistent_forged_checksum_still_needs_valid_types(cached, capsys):
    import hashlib

    _, cache, first = cached
    victim = entry_of(cache, first["layers"][1]["alpha"])
    data = json.loads(victim.read_text())
    key = data.pop("key")
    data.pop("checksum")
    data["num_evals"] = -4
    text = json.dumps({**data, "key": key}, sort_keys=True, separators=(",", ":"))
    victim.write_text(json.dumps({**data, "key": key, "checksum": hashlib.sha256(text.encode()).hexdigest()}))
    report, err = rerun(cached, capsys)
    assert "num_evals is -4" in err and report["layers"] == first["layers"]


def test_an_entry_claiming_another_key_is_a_miss(cached, capsys):
    _, cache, _ = cached
    one, two = entries(cache)[:2]
    one.write_bytes(two.read_bytes())  # a valid entry, under the wrong name
    _, err = rerun(cached, capsys)
    assert "claims the key" in err and one.name in err


@pytest.mark.parametrize("content", [DEEP, "{", '{"a": NaN}', "\ufeff{}", '{"x": 1, "x": 2}'])
def test_entries_that_are_not_strict_json_are_misses(cached, capsys, content):
    _, cache, first = cached
    entries(cache)[0].write_text(content, encoding="utf-8")
    report, err = rerun(cached, capsys)
    assert err.count("warning") == 1 and report["layers"] == first["layers"]


def test_an_entry_of_another_user_is_a_miss(cached, capsys):
    _, cache, first = cached
    os.chown(entries(cache)[0], 4242, -1)
    report, err = rerun(cached, capsys)
    assert "belongs to another user (uid 4242)" in err and report["layers"] == first["layers"]


@pytest.mark.parametrize("mode", [0o770, 0o707])
def test_a_folder_others_can_write_is_not_trusted(cached, capsys, mode):
    _, cache, first = cached
    cache.chmod(mode)
    before = {p.name: p.read_bytes() for p in entries(cache)}
    report, err = rerun(cached, capsys)
    assert err.count("warning") == 1 and "is writable by" in err and "0 of 3 matrices" in err
    assert report["layers"] == first["layers"] and {p.name: p.read_bytes() for p in entries(cache)} == before


def test_a_group_writable_entry_is_a_miss(cached, capsys):
    _, cache, _ = cached
    entries(cache)[0].chmod(0o660)
    _, err = rerun(cached, capsys)
    assert "writable by its group" in err and stat.S_IMODE(entries(cache)[0].stat().st_mode) == 0o600  # rewritten


def test_a_symlinked_entry_is_never_followed(cached, capsys):
    model, cache, first = cached
    before = model.read_bytes()
    victim = entries(cache)[0]
    victim.unlink()
    victim.symlink_to(model)
    dangling = entries(cache)[1]
    dangling.unlink()
    dangling.symlink_to(cache.parent / "created-by-a-link")
    report, err = rerun(cached, capsys)
    assert err.count("symbolic link") == 2 and report["layers"] == first["layers"]
    assert model.read_bytes() == before and not (cache.parent / "created-by-a-link").exists()
    assert not victim.is_symlink() and json.loads(victim.read_text())["key"] == victim.stem  # replaced


def test_a_fifo_entry_does_not_block(cached, capsys):
    _, cache, first = cached
    victim = entries(cache)[0]
    victim.unlink()
    os.mkfifo(victim)
    report, err = rerun(cached, capsys)
    assert "not a regular file" in err and report["layers"] == first["layers"]


# ---------------------------------------------------------------- item 9: the safetensors reader

def two_layers(l1_offsets=(4800, 9600), trailing=b"", **extra):
    """Header and data of l0 (20x60, F32) and l1, with l1's offsets as given."""
    header = {"l0.weight": f32((20, 60), 0), "l1.weight": {"dtype": "F32", "shape": [20, 60],
                                                           "data_offsets": list(l1_offsets)}, **extra}
    return header, heavy_tailed(20, 60, seed=1).numpy().tobytes() + heavy_tailed(20, 60, seed=2).numpy().tobytes() \
        + trailing


HOSTILE_HEADERS = {
    "overlapping offsets": (two_layers((0, 4800))[0], two_layers()[1][:4800], "overlap the tensor before them"),
    "a gap": (two_layers((4804, 9604))[0], two_layers(trailing=b"\0" * 4)[1], "leave a gap"),
    "trailing bytes": (*two_layers(trailing=b"\0" * 8), "8 bytes follow the last tensor"),
    "a duplicate key": (b'{"l0.weight":' + json.dumps(f32((20, 60), 0)).encode() + b',"l0.weight":'
                        + json.dumps(f32((20, 60), 0)).encode() + b"}", b"\0" * 4800, "twice"),
    "a duplicate __metadata__": (b'{"__metadata__":{"a":"b"},"__metadata__":{"a":"c"},"l0.weight":'
                                 + json.dumps(f32((20, 60), 0)).encode() + b"}", b"\0" * 4800, "twice"),
    "a byte-order mark": (("\ufeff" + json.dumps({"l0.weight": f32((20, 60), 0)})).encode(), b"\0" * 4800,
                          "byte-order mark"),
    "a NaN literal": (b'{"__metadata__":{"a":NaN},"l0.weight":' + json.dumps(f32((20, 60), 0)).encode() + b"}",
                      b"\0" * 4800, "NaN"),
    "deep nesting": (('{"__metadata__":' + DEEP + "}").encode(), b"", "nests 1001 levels deep"),
    "a boolean dimension": ({"l0.weight": {"dtype": "F32", "shape": [True, 3072], "data_offsets": [0, 12288]}},
                            b"\0" * 12288, "not a list of non-negative integers"),
    "2^63 elements": ({"l0.weight": {"dtype": "F32", "shape": [2 ** 63, 0], "data_offsets": [0, 0]}}, b"",
                      "more elements than a 64-bit count holds"),
    "an overflowing product": ({"l0.weight": {"dtype": "F32", "shape": [2 ** 62, 2 ** 62, 0], "data_offsets": [0, 0]}},
                               b"", "more elements than a 64-bit count holds"),
    "half a byte": ({"l0.weight": {"dtype": "F4", "shape": [3, 1], "data_offsets": [0, 2]}}, b"\0\0",
                    "byte boundary"),
}


@pytest.mark.parametrize("case", HOSTILE_HEADERS)
def test_hostile_safetensors_are_one_line_exit_3(tmp_path, capsys, case):
    header, data, message = HOSTILE_HEADERS[case]
    path = write_safetensors(tmp_path / "bad.safetensors", header, data)
    for command in (["analyze", path], ["prune", path, "--sparsity", "0.5", "-o", tmp_path / "out.safetensors"]):
        code, out, err = run(command, capsys)
        assert code == 3 and err.count("\n") == 1 and message in err and out == "", err
    assert not (tmp_path / "out.safetensors").exists()


def test_overlapping_offsets_never_read_one_tensor_as_another(tmp_path):
    header, data, _ = HOSTILE_HEADERS["overlapping offsets"]
    with pytest.raises(ValueError, match="overlap"):
        SafetensorsFile(write_safetensors(tmp_path / "bad.safetensors", header, data))


def test_a_fifo_is_not_read_as_safetensors(tmp_path):
    os.mkfifo(tmp_path / "pipe.safetensors")
    with pytest.raises(ValueError, match="not a regular file"):  # and it does not block
        SafetensorsFile(tmp_path / "pipe.safetensors")


@pytest.fixture
def mixed_dtypes(tmp_path):
    """A valid file with a float matrix beside C64, F8_E8M0 and F4 ones (the reference parses them)."""
    weight = heavy_tailed(120, 80, seed=4)
    complex_ = torch.randn(40, 30, dtype=torch.complex64)
    header = {"c.weight": {"dtype": "C64", "shape": [40, 30], "data_offsets": [0, 9600]},
              "f.weight": f32((120, 80), 9600),
              "e.weight": {"dtype": "F8_E8M0", "shape": [16, 16], "data_offsets": [48000, 48256]},
              "q.weight": {"dtype": "F4", "shape": [40, 30], "data_offsets": [48256, 48856]}}
    data = complex_.view(torch.uint8).numpy().tobytes() + weight.numpy().tobytes() + bytes(range(256)) \
        + bytes(i % 256 for i in range(600))
    return write_safetensors(tmp_path / "mixed.safetensors", header, data)


def test_unusable_dtypes_are_skipped_per_layer(mixed_dtypes, capsys):
    from safetensors import safe_open

    with safe_open(str(mixed_dtypes), "pt") as reference:  # a valid file for the reference too
        assert sorted(reference.keys()) == ["c.weight", "e.weight", "f.weight", "q.weight"]
    code, out, _ = run(["analyze", mixed_dtypes, "--format", "json"], capsys)
    layers = {row["name"]: row for row in json.loads(out)["layers"]}
    assert code == 0 and layers["f"]["status"] == "ok" and layers["f"]["alpha"] > 1
    assert layers["c"]["status"] == "skipped" and "stored as C64" in layers["c"]["reason"]
    assert "stored as F8_E8M0" in layers["e"]["reason"] and "stored as F4" in layers["q"]["reason"]


def test_prune_copies_unusable_dtypes_byte_for_byte(mixed_dtypes, tmp_path, capsys):
    out = tmp_path / "pruned.safetensors"
    code, _, _ = run(["prune", mixed_dtypes, "--sparsity", "0.5", "--allocation", "uniform", "-o", out], capsys)
    assert code == 0
    with SafetensorsFile(mixed_dtypes) as source, SafetensorsFile(out) as pruned:
        for key in ("c.weight", "e.weight", "q.weight"):
            assert pruned.stored(key) == source.stored(key) and torch.equal(pruned.get_raw(key), source.get_raw(key))
        assert (pruned.get_tensor("f.weight") == 0).float().mean() == pytest.approx(0.5, abs=0.01)


# ---------------------------------------------------------------- item 10: the shard index

@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    save_file({"a.weight": heavy_tailed(60, 40, seed=1)}, folder / "s1.safetensors")
    save_file({"b.weight": heavy_tailed(50, 40, seed=2)}, folder / "s2.safetensors")
    return folder


@pytest.mark.parametrize("index,message", [
    ({"weight_map": {"a.weight": "s1.safetensors", "b.weight": "s3.bin"}}, "both safetensors and torch"),
    ({"weight_map": {"a.weight": "s1.safetensors", "b.weight": ""}}, "not a shard file name"),
    ({"weight_map": {"a.weight": "s1.safetensors", "b.weight": "../../../../etc/passwd"}}, "not a shard file name"),
    ({"weight_map": {"a.weight": "s1.safetensors", "b.weight": "../s2.safetensors"}}, "not a shard file name"),
    ({"weight_map": {"a.weight": "s1.safetensors", "b.weight": 7}}, "not a shard file name"),
    ([1, 2], "is not a JSON object"),
    ("s1.safetensors", "is not a JSON object"),
    ({"metadata": {}}, "has no weight_map"),
])
def test_a_bad_shard_index_is_exit_3_with_the_reason(shards, capsys, monkeypatch, index, message):
    (shards / "model.safetensors.index.json").write_text(json.dumps(index))
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    code, out, err = run(["analyze", shards], capsys)
    assert code == 3 and err.count("\n") == 1 and message in err and out == ""
    assert all(str(shards) in path or not path.startswith("/") for path in opened)  # nothing outside is read


@pytest.mark.parametrize("content,message", [(DEEP, "nests 1000 levels deep"), ('{"weight_map": NaN}', "NaN")])
def test_an_index_that_is_not_strict_json_is_exit_3(shards, capsys, content, message):
    (shards / "model.safetensors.index.json").write_text(content)
    code, _, err = run(["analyze", shards], capsys)
    assert code == 3 and err.count("\n") == 1 and message in err


# ---------------------------------------------------------------- item 12: bounded work per header

def test_too_many_tensors_are_refused_before_any_work(tmp_path, capsys):
    entry = {"dtype": "F32", "shape": [0, 8], "data_offsets": [0, 0]}
    header = json.dumps({f"l{i}.weight": entry for i in range(MAX_TENSORS + 1)}).encode()
    path = write_safetensors(tmp_path / "many.safetensors", header)
    code, _, err = run(["analyze", path], capsys)
    assert code == 3 and f"at most {MAX_TENSORS} per file" in err and err.count("\n") == 1
