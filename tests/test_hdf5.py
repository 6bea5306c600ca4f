import json
import os

import h5py
import numpy as np
import pytest

from worldvla.data import Demo, DemoFormatError, iter_demos, read_demos, write_demos
from worldvla.data.hdf5 import demo_file_info, steps_without_noops


@pytest.fixture
def np_rng():
    return np.random.default_rng(int.from_bytes(os.urandom(4), "little"))


def random_demo(rng, t, h, w, d, **kw):
    return Demo(frames=rng.integers(0, 256, size=(t, h, w, 3), dtype=np.uint8),
                actions=rng.uniform(-1, 1, size=(t, d)).astype(np.float32), **kw)


def test_round_trip(tmp_path, np_rng):
    # 12 demos so that demo_10 / demo_11 must sort after demo_2 (numeric, not string order).
    shapes = [(1 + int(np_rng.integers(0, 9)), 13, 11) for _ in range(12)]
    demos = [random_demo(np_rng, t, h, w, 7, instruction="", success=bool(i % 3)) for i, (t, h, w) in enumerate(shapes)]
    demos[4].instruction = "a different instruction"
    path = write_demos(tmp_path / "sub" / "demos.hdf5", demos, "open the top drawer", camera="wrist")
    back = read_demos(path)
    assert len(back) == len(demos)
    for i, (a, b) in enumerate(zip(demos, back)):
        assert b.name == f"demo_{i}"
        assert b.frames.dtype == np.uint8 and b.frames.shape == a.frames.shape
        np.testing.assert_array_equal(b.frames, a.frames)
        assert b.actions.dtype == np.float32
        np.testing.assert_array_equal(b.actions, a.actions)
        assert b.success == a.success
        assert b.instruction == ("a different instruction" if i == 4 else "open the top drawer")
    info = demo_file_info(path)
    assert info["num_demos"] == 12 and info["steps"] == [s[0] for s in shapes]
    assert info["instruction"] == "open the top drawer"
    assert info["attrs"]["total"] == sum(s[0] for s in shapes)
    # Nothing left behind by the atomic write.
    assert sorted(p.name for p in path.parent.iterdir()) == ["demos.hdf5"]


def test_mapping_demos_and_camera_choice(tmp_path, np_rng):
    d = random_demo(np_rng, 5, 9, 7, 4, instruction="")
    path = write_demos(tmp_path / "m.hdf5", [{"frames": d.frames, "actions": d.actions.astype(np.float64)}],
                       "push", camera="agentview")
    (b,) = read_demos(path, camera="agentview")
    np.testing.assert_array_equal(b.frames, d.frames)
    assert b.success is True and b.instruction == "push"
    with pytest.raises(DemoFormatError, match="eye_in_hand"):
        read_demos(path, camera="eye_in_hand")


def test_iter_demos_is_lazy(tmp_path, np_rng):
    demos = [random_demo(np_rng, 3, 8, 8, 2, instruction="x") for _ in range(3)]
    path = write_demos(tmp_path / "lazy.hdf5", demos, "x")
    it = iter_demos(path)
    first = next(it)
    np.testing.assert_array_equal(first.frames, demos[0].frames)
    assert [d.name for d in it] == ["demo_1", "demo_2"]


def test_failed_write_keeps_old_file(tmp_path, np_rng):
    path = tmp_path / "d.hdf5"
    good = [random_demo(np_rng, 4, 6, 6, 3, instruction="")]
    write_demos(path, good, "first")
    bad = good + [Demo(frames=np_rng.random((4, 6, 6, 3)), actions=np.zeros((4, 3)), instruction="")]
    with pytest.raises(ValueError, match="uint8"):
        write_demos(path, bad, "second")
    assert read_demos(path)[0].instruction == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.hdf5"]


@pytest.mark.parametrize("frames_shape, actions_shape, match", [
    ((4, 6, 6, 3), (5, 3), "one frame per action"),
    ((4, 6, 6), (4, 3), r"\[T, H, W, 3\]"),
    ((4, 6, 6, 3), (4,), r"\[T, D\]"),
])
def test_write_rejects_bad_shapes(tmp_path, frames_shape, actions_shape, match):
    demo = {"frames": np.ones(frames_shape, np.uint8), "actions": np.ones(actions_shape)}
    with pytest.raises(ValueError, match=match):
        write_demos(tmp_path / "x.hdf5", [demo], "x")
    with pytest.raises(ValueError, match="NaN"):
        write_demos(tmp_path / "x.hdf5", [{"frames": np.ones((2, 4, 4, 3), np.uint8),
                                            "actions": np.array([[0.0], [np.nan]])}], "x")
    assert not any(tmp_path.iterdir())


def write_libero_like(path, rng, n=2, key="agentview_rgb", instruction="put the bowl on the plate"):
    """A file laid out like LIBERO's released HDF5 (instruction only inside problem_info)."""
    raw = []
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps({"problem_name": "libero_tabletop_manipulation",
                                                 "domain_name": "robosuite", "language_instruction": instruction})
        data.attrs["env_name"] = "Libero_Tabletop_Manipulation"
        for i in range(n):
            t = 3 + i
            frames = rng.integers(0, 256, size=(t, 10, 12, 3), dtype=np.uint8)
            g = data.create_group(f"demo_{i}")
            g.create_dataset(f"obs/{key}", data=frames)
            g.create_dataset("obs/eye_in_hand_rgb", data=rng.integers(0, 256, size=(t, 10, 12, 3), dtype=np.uint8))
            g.create_dataset("obs/joint_states", data=rng.random((t, 7)))
            g.create_dataset("actions", data=rng.uniform(-1, 1, (t, 7)))
            dones = np.zeros(t, np.uint8)
            dones[-1] = 1
            g.create_dataset("dones", data=dones)
            raw.append(frames)
    return raw


def test_libero_problem_info_instruction(tmp_path, np_rng):
    path = tmp_path / "libero.hdf5"
    raw = write_libero_like(path, np_rng)
    demos = read_demos(path)
    assert [d.instruction for d in demos] == ["put the bowl on the plate"] * 2
    assert all(d.success for d in demos)
    assert demos[1].actions.shape == (4, 7) and demos[1].actions.dtype == np.float32
    # LIBERO stores agentview upside down; read_demos turns raw LIBERO files upright.
    np.testing.assert_array_equal(demos[0].frames, raw[0][:, ::-1, ::-1])
    np.testing.assert_array_equal(read_demos(path, rotate_180=False)[0].frames, raw[0])
    assert demo_file_info(path)["instruction"] == "put the bowl on the plate"


def test_regenerated_libero_files(tmp_path, np_rng):
    """The files the release trains on (LIBERO's demos regenerated at 256 / 512 px, no-ops filtered) keep no
    attributes: their frames are LIBERO's upside-down cameras and their instruction is the task's name."""
    path = tmp_path / "put_the_bowl_on_the_plate_demo.hdf5"
    raw = write_libero_like(path, np_rng)
    with h5py.File(path, "a") as f:
        for k in list(f["data"].attrs):
            del f["data"].attrs[k]
    demos = read_demos(path)
    assert [d.instruction for d in demos] == ["put the bowl on the plate"] * 2
    np.testing.assert_array_equal(demos[0].frames, raw[0][:, ::-1, ::-1])
    np.testing.assert_array_equal(read_demos(path, rotate_180=False)[0].frames, raw[0])
    # LIBERO-10/90 task names start with their scene, which their instruction does not hold
    for name, want in (("LIVING_ROOM_SCENE2_put_both_the_soup_in_the_basket_demo", "put both the soup in the basket"),
                       ("KITCHEN_SCENE10_close_the_top_drawer_demo", "close the top drawer")):
        scene = tmp_path / f"{name}.hdf5"
        path.rename(scene)
        assert read_demos(scene)[0].instruction == want
        scene.rename(path)
    # robomimic's camera keys are read as they are
    other = tmp_path / "robomimic_demo.hdf5"
    raw = write_libero_like(other, np_rng, n=1, key="agentview_image")
    with h5py.File(other, "a") as f:
        del f["data"].attrs["problem_info"]
        for g in f["data"].values():
            del g["obs/eye_in_hand_rgb"]
    np.testing.assert_array_equal(read_demos(other)[0].frames, raw[0])


def test_empty_and_all_noop_demos(tmp_path, np_rng):
    """An empty demo is refused by name (it ended in an IndexError); a demo of no-ops only is skipped with a
    warning under drop_noops (the store then failed on an empty list); 1-D actions are refused."""
    path = tmp_path / "d.hdf5"
    frames = np_rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    still = np.zeros((3, 7), np.float32)
    still[:, -1] = -1
    moving = np_rng.uniform(-1, 1, (3, 7)).astype(np.float32)
    write_demos(path, [{"frames": frames, "actions": still}, {"frames": frames, "actions": moving}], "push")
    with pytest.warns(UserWarning, match="every step is a no-op"):
        demos = read_demos(path, drop_noops=True)
    assert len(demos) == 1 and np.array_equal(demos[0].actions, moving)
    with h5py.File(path, "a") as f:
        del f["data/demo_1/actions"]
        f["data/demo_1/actions"] = np.zeros(3, np.float32)
    with pytest.raises(DemoFormatError, match=r"actions must be \[T, D\]"):
        read_demos(path)
    with h5py.File(path, "a") as f:
        del f["data/demo_1/actions"], f["data/demo_1/obs/agentview_rgb"]
        f["data/demo_1/actions"] = np.zeros((0, 7), np.float32)
        f["data/demo_1/obs/agentview_rgb"] = np.zeros((0, 8, 8, 3), np.uint8)
    with pytest.raises(DemoFormatError, match="an empty demo"):
        read_demos(path)


def test_noop_steps_dropped_as_the_release_does(tmp_path, np_rng):
    """A step is a no-op when its arm action is ~0 and its gripper command is the last kept step's; the first
    step is judged by its arm action alone. Dropped with its frame."""
    a = np.zeros((7, 7), np.float32)
    a[:, -1] = [-1, -1, -1, 1, 1, 1, -1]  # gripper commands
    a[2, :6] = 0.5                        # arm moves at step 2
    a[5, 0] = 5e-5                        # below the threshold
    assert steps_without_noops(a).tolist() == [2, 3, 6]  # 0: still; 1: still, same gripper; 3, 6: gripper changes
    frames = np_rng.integers(0, 256, size=(7, 8, 8, 3), dtype=np.uint8)
    write_demos(tmp_path / "d.hdf5", [{"frames": frames, "actions": a}], "push")
    (d,) = read_demos(tmp_path / "d.hdf5", drop_noops=True)
    np.testing.assert_array_equal(d.frames, frames[[2, 3, 6]])
    np.testing.assert_array_equal(d.actions, a[[2, 3, 6]])
    assert len(read_demos(tmp_path / "d.hdf5")[0]) == 7


def test_robomimic_image_key(tmp_path, np_rng):
    path = tmp_path / "robomimic.hdf5"
    raw = write_libero_like(path, np_rng, n=1, key="agentview_image")
    (d,) = read_demos(path, rotate_180=False)
    np.testing.assert_array_equal(d.frames, raw[0])
    (w,) = read_demos(path, camera="eye_in_hand", rotate_180=False)
    assert not np.array_equal(w.frames, raw[0])


def test_missing_groups_are_named(tmp_path, np_rng):
    path = tmp_path / "bad.hdf5"
    with h5py.File(path, "w") as f:
        f.create_group("episodes")
    with pytest.raises(DemoFormatError, match="no 'data' group"):
        read_demos(path)

    with h5py.File(path, "w") as f:
        f.create_dataset("data/demo_0/obs/agentview_rgb", data=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(DemoFormatError, match="demo_0.*'actions'"):
        read_demos(path)

    with h5py.File(path, "w") as f:
        f.create_dataset("data/demo_0/actions", data=np_rng.random((2, 7)))
    with pytest.raises(DemoFormatError, match="demo_0.*'obs'"):
        read_demos(path)

    with h5py.File(path, "w") as f:
        f.create_dataset("data/demo_0/actions", data=np_rng.random((2, 7)))
        f.create_dataset("data/demo_0/obs/joint_states", data=np_rng.random((2, 7)))
    with pytest.raises(DemoFormatError, match="no camera frames.*joint_states"):
        read_demos(path)

    with pytest.raises(FileNotFoundError):
        read_demos(tmp_path / "nope.hdf5")


def test_a_file_that_is_not_hdf5_or_is_cut_short_is_named(tmp_path, np_rng):
    """h5py's "file signature not found" / "truncated file" did not say which file."""
    text = tmp_path / "notes.log"
    text.write_text("hello\n")
    good = write_demos(tmp_path / "d.hdf5", [random_demo(np_rng, 4, 8, 8, 7, instruction="")], "push")
    cut = tmp_path / "cut.hdf5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for read in (demo_file_info, read_demos):
        with pytest.raises(DemoFormatError, match=f"{text}: not an HDF5 file"):
            read(text)
        with pytest.raises(OSError, match=f"{cut}: cannot read this HDF5 file, it may be damaged or cut short"):
            read(cut)


def test_a_damaged_dataset_is_named_with_what_to_do(tmp_path):
    """A corrupt compressed chunk in a demo's frames was h5py's "Can't synchronously read data (filter returned
    failure during read)", naming neither the file nor the demo; from pretokenize and train-vq alike."""
    rng = np.random.default_rng(0)
    demos = [random_demo(rng, 4, 8, 8, 7, instruction="") for _ in range(2)]
    path = write_demos(tmp_path / "d.hdf5", demos, "push")
    with h5py.File(path) as f:
        offset = f["data/demo_1/obs/agentview_rgb"].id.get_chunk_info(0).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset + 20:offset + 200] = bytes(180)
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{path}:data/demo_1/obs/agentview_rgb: cannot read this dataset, the file "
                                         f"is damaged .*collect or copy the file again"):
        read_demos(path)


def test_files_read_as_libero_are_named_with_the_option_that_keeps_them(tmp_path, np_rng, monkeypatch):
    """The files `iter_demos` rotates on its own are the ones `rotation_note` names, with the option to pass."""
    from worldvla.data import hdf5
    from worldvla.data.hdf5 import looks_like_libero, reading_record, rotation_note

    write_libero_like(tmp_path / "raw.hdf5", np_rng)
    with h5py.File(tmp_path / "regen.hdf5", "w") as f:  # regenerated: LIBERO's camera keys, no attributes
        f.create_dataset("data/demo_0/obs/eye_in_hand_rgb", data=np.zeros((2, 8, 8, 3), np.uint8))
        f.create_dataset("data/demo_0/actions", data=np.zeros((2, 7), np.float32))
    write_demos(tmp_path / "ours.hdf5", [random_demo(np_rng, 2, 8, 8, 4, instruction="reach")], "reach")
    with h5py.File(tmp_path / "robomimic.hdf5", "w") as f:
        f.create_dataset("data/demo_0/obs/agentview_image", data=np.zeros((2, 8, 8, 3), np.uint8))
        f.create_dataset("data/demo_0/actions", data=np.zeros((2, 7), np.float32))
    files = [tmp_path / n for n in ("raw.hdf5", "regen.hdf5", "ours.hdf5", "robomimic.hdf5")]
    assert [looks_like_libero(f) for f in files] == [True, True, False, False]
    note = rotation_note(files)
    assert "2 demo file(s) (raw.hdf5, regen.hdf5)" in note and "--rotate-180 no" in note and "\n" not in note
    assert rotation_note(files, rotate_180=True) is None and rotation_note(files[2:]) is None
    assert "--rotate-180 no" in rotation_note(files[:1], option="--rotate-180 no")
    # The turns a caller has read already (a token store's reading records) give the same line, opening no file.
    turns = [reading_record(f)["rotation"] for f in files]
    monkeypatch.setattr(hdf5, "open_demo_file", lambda path: pytest.fail(f"{path} opened again"))
    assert rotation_note(files, turns=turns) == note and rotation_note(files[2:], turns=turns[2:]) is None
    assert rotation_note(files, rotate_180=False, turns=turns) is None
    with pytest.raises(ValueError, match="3 turns for 4 files"):
        rotation_note(files, turns=turns[1:])


def test_libero_files_of_the_opencv_convention_are_mirrored_to_the_release_view(tmp_path, np_rng):
    """LIBERO's `macros_image_convention` was ignored: a file collected with robosuite's "opencv" convention (rows
    flipped already) was rotated by 180 degrees like an "opengl" one, so its frames were mirrored against the
    release's. It is mirrored left-right now; "opengl" or no attribute keep the rotation; rotate_180 True / False
    keep their meaning."""
    from worldvla.data.hdf5 import frame_turn, rotation_note

    raw = {}
    for convention in ("opengl", "opencv", None):
        path = tmp_path / f"{convention}.hdf5"
        raw[convention] = write_libero_like(path, np_rng, n=1)[0]
        if convention:
            with h5py.File(path, "a") as f:
                f["data"].attrs["macros_image_convention"] = convention
    read = lambda c, **k: read_demos(tmp_path / f"{c}.hdf5", **k)[0].frames  # noqa: E731
    np.testing.assert_array_equal(read("opencv"), raw["opencv"][:, :, ::-1])
    for c in ("opengl", None):
        np.testing.assert_array_equal(read(c), raw[c][:, ::-1, ::-1])
    np.testing.assert_array_equal(read("opencv", rotate_180=True), raw["opencv"][:, ::-1, ::-1])
    np.testing.assert_array_equal(read("opencv", rotate_180=False), raw["opencv"])
    files = [tmp_path / f"{c}.hdf5" for c in ("opengl", "opencv", None)]
    assert [frame_turn(f) for f in files] == ["rotated_180", "mirrored", "rotated_180"]
    note = rotation_note(files)
    assert "2 demo file(s) (opengl.hdf5, None.hdf5) are rotated by 180 degrees" in note and "\n" not in note
    assert "1 demo file(s) (opencv.hdf5) are mirrored left-right" in note and "--rotate-180 no" in note
    assert "are mirrored left-right" in rotation_note(files[1:2]) and "rotated by" not in rotation_note(files[1:2])


def test_a_files_demos_are_all_read_from_one_camera(tmp_path, np_rng):
    """A demo without the camera the file's first demo was read from was read from another one, silently (a
    robomimic file whose demo_1 lost its agentview frames gave wrist frames)."""
    path = tmp_path / "mixed.hdf5"
    with h5py.File(path, "w") as f:
        d = f.create_group("data")
        d.attrs["instruction"] = "stack"
        for i in range(2):
            if i == 0:
                d.create_dataset(f"demo_{i}/obs/agentview_image", data=np.full((3, 8, 8, 3), 10, np.uint8))
            d.create_dataset(f"demo_{i}/obs/robot0_eye_in_hand_image", data=np.full((3, 8, 8, 3), 200, np.uint8))
            d.create_dataset(f"demo_{i}/actions", data=np.zeros((3, 7), np.float32))
    with pytest.raises(DemoFormatError, match=r"data/demo_1: no obs/agentview_image, the camera .*first demo, "
                                              r"demo_0.*--camera"):
        read_demos(path)
    assert [int(d.frames.mean()) for d in read_demos(path, camera="robot0_eye_in_hand")] == [200, 200]


def test_float_frames_are_refused_with_advice_that_keeps_them(tmp_path):
    """The advice for float frames, np.clip(x, 0, 255).astype(np.uint8), turned [0, 1] images black."""
    import re

    x = np.random.default_rng(0).random((3, 8, 8, 3), dtype=np.float32)
    actions = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=re.escape("(x * 255).round().astype(np.uint8)")) as e:
        write_demos(tmp_path / "a.hdf5", [{"frames": x, "actions": actions}], "x")
    assert "np.clip" not in str(e.value)
    fixed = (x * 255).round().astype(np.uint8)  # as advised
    path = write_demos(tmp_path / "a.hdf5", [{"frames": fixed, "actions": actions}], "x")
    assert read_demos(path)[0].frames.max() > 200
    with pytest.raises(ValueError, match=re.escape("((x + 1) * 127.5).round()")):
        write_demos(tmp_path / "b.hdf5", [{"frames": x * 2 - 1, "actions": actions}], "x")
    with pytest.raises(ValueError, match=re.escape("np.clip(x, 0, 255).astype(np.uint8)")):
        write_demos(tmp_path / "c.hdf5", [{"frames": x * 255, "actions": actions}], "x")


def test_robomimic_files_are_not_prompted_with_their_file_name(tmp_path, np_rng):
    """robomimic keeps no instruction and names every task's file image.hdf5: all were prompted with "image". The
    file name is taken for LIBERO-looking files only (as the release does); robomimic's env name is the guess; an
    `instruction` given is every demo's."""
    from worldvla.data.hdf5 import reading_record

    path = tmp_path / "lift" / "image.hdf5"
    path.parent.mkdir()
    write_libero_like(path, np_rng, n=2, key="agentview_image")
    with h5py.File(path, "a") as f:
        del f["data"].attrs["problem_info"]
        f["data"].attrs["env_args"] = json.dumps({"env_name": "NutAssemblySquare"})
        f["data/demo_1"].attrs["instruction"] = "its own"
        for g in f["data"].values():  # robomimic's cameras only
            del g["obs/eye_in_hand_rgb"]
    assert [d.instruction for d in read_demos(path)] == ["nut assembly square", "its own"]
    assert [d.instruction for d in read_demos(path, instruction="lift it")] == ["lift it"] * 2
    rec = reading_record(path)
    assert rec["instruction_from"] == "env name" and rec["demo_instructions"] == {"demo_1": "its own"}
    assert reading_record(path, instruction="lift it")["instruction_from"] == "--instruction"
    regen = tmp_path / "put_the_bowl_on_the_plate_demo.hdf5"
    write_libero_like(regen, np_rng, n=1)
    with h5py.File(regen, "a") as f:
        del f["data"].attrs["problem_info"]
    assert read_demos(regen)[0].instruction == "put the bowl on the plate"
    assert reading_record(regen)["instruction_from"] == "file name"
