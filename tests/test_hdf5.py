import json
import os
import re

import h5py
import numpy as np
import pytest

from worldvla.data import Demo, DemoFormatError, iter_demos, read_demos, write_demos
from worldvla.data.hdf5 import demo_file_info, iter_demo_actions, steps_without_noops


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
        assert b.actions.dtype == np.float64  # the values as written (float32), read as the release reads them
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
    assert demos[1].actions.shape == (4, 7) and demos[1].actions.dtype == np.float64
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


def test_a_libero_file_of_an_unknown_image_convention_is_refused_unless_told_how_to_turn_it(tmp_path, np_rng):
    """A `macros_image_convention` other than "opengl" or "opencv" (a typo, a newer robosuite's name) was read as
    "opengl", so the frames were rotated by a guess. Now the file is refused, named, until rotate_180 says how."""
    from worldvla.data.hdf5 import frame_turn, reading_record

    path = tmp_path / "odd.hdf5"
    raw = write_libero_like(path, np_rng, n=1)[0]
    with h5py.File(path, "a") as f:
        f["data"].attrs["macros_image_convention"] = "OpenCV2"
    for read in (lambda: read_demos(path), lambda: frame_turn(path), lambda: reading_record(path)):
        with pytest.raises(ValueError, match=r"odd\.hdf5: macros_image_convention 'opencv2' is neither.*--rotate-180"):
            read()
    np.testing.assert_array_equal(read_demos(path, rotate_180=False)[0].frames, raw)
    np.testing.assert_array_equal(read_demos(path, rotate_180=True)[0].frames, raw[:, ::-1, ::-1])
    assert frame_turn(path, rotate_180=False) == "none"
    with h5py.File(path, "a") as f:
        f["data"].attrs["macros_image_convention"] = b" OpenGL "  # bytes and case, as some writers store it
    np.testing.assert_array_equal(read_demos(path)[0].frames, raw[:, ::-1, ::-1])


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


def _every_reader():
    from worldvla.data import hdf5

    return {"demo_file_info": hdf5.demo_file_info, "read_demos": read_demos,
            "iter_demo_actions": lambda p: list(hdf5.iter_demo_actions(p)), "reading_record": hdf5.reading_record,
            "looks_like_libero": hdf5.looks_like_libero, "frame_turn": hdf5.frame_turn}


def test_a_damaged_file_structure_is_named_with_what_to_do(tmp_path):
    """A few damaged bytes in a file's groups (a B-tree, symbol table node or local heap of HDF5's) gave h5py's
    RuntimeError "Unable to get group info (bad symbol table node signature)" or KeyError "Unable to synchronously
    open object", naming neither the file nor the demo, as tracebacks from pretokenize, train-vq and imagine.
    Every structure of a small file is damaged in turn (its signature zeroed), and every reader is tried on it."""
    rng = np.random.default_rng(0)
    good = write_demos(tmp_path / "good.hdf5", [random_demo(rng, 4, 8, 8, 3, instruction="") for _ in range(3)],
                       "push")
    raw = good.read_bytes()
    offsets = sorted(i for sig in (b"TREE", b"SNOD", b"HEAP") for i in range(len(raw)) if raw.startswith(sig, i))
    assert len(offsets) > 10
    path = tmp_path / "damaged.hdf5"
    said = []
    for offset in offsets:
        data = bytearray(raw)
        data[offset:offset + 4] = bytes(4)
        path.write_bytes(bytes(data))
        for name, read in _every_reader().items():
            try:
                read(path)
            except (ValueError, OSError) as e:
                assert str(path) in str(e), (offset, name, e)
                said.append(str(e))
            # any other exception (h5py's RuntimeError, KeyError) fails the test, showing where
    damaged = [s for s in said if "cannot read the file's structure, it is damaged" in s]
    assert damaged and all("collect or copy the file again, or leave it out of the inputs" in s for s in damaged)
    assert any(s.startswith(f"{path}: ") for s in damaged)  # the file's own groups
    assert any(s.startswith(f"{path}:data/demo_") for s in damaged)  # a demo's: named by it


def test_files_of_another_layout_are_refused_naming_the_layout_expected(tmp_path):
    """A `data` that is a dataset, a demo or its `actions` / `obs` / frames of the other kind (group or dataset) and
    a LIBERO problem_info that is not a JSON object were AttributeErrors ("'Dataset' object has no attribute
    'keys'", "'Group' object has no attribute 'shape'", "'list' object has no attribute 'get'") from the readers."""
    path = tmp_path / "other.hdf5"
    frames, actions = np.zeros((2, 4, 4, 3), np.uint8), np.zeros((2, 3), np.float32)

    def layout(build):
        with h5py.File(path, "w") as f:
            build(f)

    def demo(f, frames_as_group=False, actions_as_group=False, obs_as_dataset=False):
        g = f.create_group("data/demo_0")
        if actions_as_group:
            g.create_group("actions")
        else:
            g["actions"] = actions
        if obs_as_dataset:
            g["obs"] = frames
        elif frames_as_group:
            g.create_group("obs/agentview_rgb")
        else:
            g["obs/agentview_rgb"] = frames
        return f["data"]

    cases = [
        (lambda f: f.create_dataset("data", data=np.arange(3.0)),
         rf"{path}: 'data' is a dataset \(shape \(3,\), dtype float64\), not a group.*expected a 'data' group holding "
         rf"one group per demo: data/demo_0/actions \[T, D\]"),
        (lambda f: f.create_dataset("data/demo_0", data=np.arange(3.0)),
         rf"{path}:data/demo_0: a dataset .*, not a group; expected a 'data' group"),
        (lambda f: demo(f, actions_as_group=True),
         rf"{path}:data/demo_0/actions: a group \(keys: \[\]\), not a dataset; every demo's 'actions' is one array"),
        (lambda f: demo(f, obs_as_dataset=True), rf"{path}:data/demo_0/obs: a dataset .*, not a group"),
        (lambda f: demo(f, frames_as_group=True),
         rf"{path}:data/demo_0/obs/agentview_rgb: a group .*, not a dataset"),
        (lambda f: demo(f).attrs.__setitem__("problem_info", "[1, 2]"),
         rf"{path}: data.attrs\['problem_info'\] is a JSON list, not an object; LIBERO's files hold a JSON object "
         rf"with the task's \"language_instruction\".*data.attrs\['instruction'\]"),
        (lambda f: demo(f).attrs.__setitem__("problem_info", "{not json"),
         rf"{path}: data.attrs\['problem_info'\] is not valid JSON"),
    ]
    for build, match in cases:
        layout(build)
        for name, read in _every_reader().items():
            try:
                read(path)
            except DemoFormatError as e:
                assert re.search(match, str(e)), (name, str(e), match)
            # a reader that needs no more of the file than is right passes; another exception fails the test
        with pytest.raises(DemoFormatError, match=match):
            if "obs" in match:  # frames are not summarized by demo_file_info
                read_demos(path)
            else:
                demo_file_info(path)


def test_demo_file_info_says_which_demos_succeeded(tmp_path, np_rng):
    """Without reading frames: pretokenize refuses inputs without a successful demo before any work with it."""
    demos = [random_demo(np_rng, 3, 4, 4, 2, instruction="", success=ok) for ok in (True, False, True)]
    assert demo_file_info(write_demos(tmp_path / "d.hdf5", demos, "x"))["success"] == [True, False, True]
    write_libero_like(tmp_path / "libero.hdf5", np_rng, n=2)  # no attribute: LIBERO's last `dones` flag
    with h5py.File(tmp_path / "libero.hdf5", "a") as f:
        f["data/demo_1/dones"][-1] = 0
    assert demo_file_info(tmp_path / "libero.hdf5")["success"] == [True, False]


def _dead_pid():
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporary_files_of_killed_writers_are_removed_and_a_running_ones_kept(tmp_path, np_rng):
    """A `write_demos` killed partway (SIGKILL, the OOM killer) left its hidden `.<name>.tmp-<pid>` beside the file,
    and nothing removed it."""
    import subprocess
    import sys

    from worldvla.data.hdf5 import remove_stale_temps, temp_name

    path = tmp_path / "reach-v3.hdf5"
    dead = _dead_pid()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [tmp_path / f".reach-v3.hdf5.tmp-{dead}", tmp_path / f".reach-v3.hdf5.tmp-{dead}-0123456789ab",
                 tmp_path / f".reach-v3.hdf5.tmp-{os.getpid()}-00aa00aa00aa"]
        kept = [tmp_path / f".reach-v3.hdf5.tmp-{running.pid}-0123456789ab", tmp_path / f".push-v3.hdf5.tmp-{dead}",
                tmp_path / f".reach-v3.hdf5.tmp-{dead}.keep", tmp_path / "notes.txt"]
        for p in stale + kept:
            p.write_bytes(b"partial")
        assert sorted(remove_stale_temps(path)) == sorted(stale)
        assert sorted(tmp_path.iterdir()) == sorted(kept)
        assert temp_name(path).name.startswith(f".reach-v3.hdf5.tmp-{os.getpid()}-")
        write_demos(path, [random_demo(np_rng, 2, 4, 4, 2, instruction="")], "reach")  # and its own is gone after it
        assert sorted(tmp_path.iterdir()) == sorted(kept + [path])
    finally:
        running.kill()
        running.wait()


def test_write_demos_removes_the_temporary_file_a_killed_write_left(tmp_path, np_rng):
    """Called from Python, not only through `collect`: the file a killed earlier write left goes with the next write."""
    path = tmp_path / "reach-v3.hdf5"
    left = tmp_path / f".reach-v3.hdf5.tmp-{_dead_pid()}-0123456789ab"
    left.write_bytes(b"partial")
    write_demos(path, [random_demo(np_rng, 2, 4, 4, 2, instruction="")], "reach")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reach-v3.hdf5"]


def test_collect_removes_the_temporary_file_a_killed_run_left(tmp_path):
    pytest.importorskip("metaworld")
    from worldvla.data.collect import collect

    left = tmp_path / f".reach-v3.hdf5.tmp-{_dead_pid()}"
    left.write_bytes(b"partial")
    collect(["reach-v3"], 1, tmp_path, image_size=32, workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reach-v3.hdf5"]


_TERMINATED_WHILE_WRITING = """
import argparse, sys, time
from pathlib import Path
import numpy as np
from worldvla.data import collect as c

def collect(tasks, n, out, **kw):  # one task file written slowly: SIGTERM arrives while its temporary file exists
    def demos():
        yield {"frames": np.zeros((2, 8, 8, 3), np.uint8), "actions": np.zeros((2, 3), np.float32)}
        print("writing", flush=True)
        time.sleep(60)
    c.write_demos(Path(out) / "reach-v3.hdf5", demos(), "reach")

c.collect = collect
sys.exit(c.run(c.add_arguments(argparse.ArgumentParser()).parse_args(["--out", sys.argv[1], "--tasks", "reach-v3"])))
"""


def test_a_collect_terminated_while_writing_leaves_no_temporary_file(tmp_path):
    """SIGTERM (`kill`, a scheduler's stop) ended `worldvla collect` at once, leaving the task file's hidden
    temporary file behind."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "slow_collect.py"
    script.write_text(_TERMINATED_WHILE_WRITING)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=tmp_path)
    try:
        assert p.stdout.readline().strip() == "writing", p.stderr.read()
        assert [q.name for q in out.iterdir()][0].startswith(".reach-v3.hdf5.tmp-")
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == -signal.SIGTERM
    assert "terminated; run the same command again to continue" in err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("blank", ["", "   ", "\n\t"])
def test_empty_instructions_are_taken_as_none(tmp_path, np_rng, blank):
    """An empty (or whitespace-only) instruction was written and read as it was, so demos trained on the prompt
    "What action should the robot take to ?"; a mapping demo's empty one was kept while a Demo's fell back to the
    file's. write_demos refuses an empty file instruction; a demo's own empty one is none (the file's is used), and a
    file's empty instruction attribute or LIBERO problem_info without a language_instruction is the "none" case."""
    from worldvla.data.hdf5 import FROM_NOWHERE, reading_record

    d = random_demo(np_rng, 3, 8, 8, 2, instruction=blank)
    with pytest.raises(ValueError, match="instruction must be a non-empty text.*pass the task's instruction"):
        write_demos(tmp_path / "e.hdf5", [d], blank)
    assert not any(tmp_path.iterdir())
    mapping = {"frames": d.frames, "actions": d.actions, "instruction": blank}
    path = write_demos(tmp_path / "m.hdf5", [mapping, d], "open the drawer")
    assert [x.instruction for x in read_demos(path)] == ["open the drawer"] * 2
    with h5py.File(path, "a") as f:  # a file written otherwise: blank attributes
        f["data"].attrs["instruction"] = blank
        for g in f["data"].values():
            g.attrs["instruction"] = blank
    rec = reading_record(path)
    assert rec["instruction_from"] == FROM_NOWHERE and rec["uses_file_instruction"] and "demo_instructions" not in rec
    assert [x.instruction for x in read_demos(path, instruction="push it")] == ["push it"] * 2
    libero = tmp_path / "libero.hdf5"
    write_libero_like(libero, np_rng, instruction=blank)
    assert reading_record(libero)["instruction_from"] == FROM_NOWHERE
    assert demo_file_info(libero)["instruction_from"] == FROM_NOWHERE
    with h5py.File(libero, "a") as f:  # problem_info without the key at all
        f["data"].attrs["problem_info"] = json.dumps({"problem_name": "libero_tabletop_manipulation"})
    assert reading_record(libero)["instruction_from"] == FROM_NOWHERE


def test_write_demos_flushes_the_file_and_its_folder_around_the_rename(tmp_path, np_rng, monkeypatch):
    """write_demos promised an atomic write but renamed its temporary file without flushing it or the folder: a
    power loss could leave the name on an empty or partial file."""
    import stat

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", stat.S_ISDIR(st.st_mode), st.st_ino))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = write_demos(tmp_path / "sub" / "a.hdf5", [random_demo(np_rng, 3, 8, 8, 2, instruction="")], "reach")
    i = events.index(("replace", str(path)))
    assert ("fsync", False, path.stat().st_ino) in events[:i]  # the file (renamed: the same inode), before
    assert ("fsync", True, path.parent.stat().st_ino) in events[i + 1:]  # its folder, after


def test_drop_noops_keeps_the_frame_each_kept_action_led_to(tmp_path, np_rng):
    """After dropped no-op steps the next kept frame is not the one the kept action before them led to (the
    release replays the kept actions to render that one): the file's frame after the action is kept for it."""
    a = np.zeros((8, 4), np.float32)
    a[:, -1] = 1.0
    a[[0, 1, 2, 5, 6], :3] = 0.5  # steps 3, 4 and 7 are no-ops
    frames = np_rng.integers(0, 256, size=(8, 6, 6, 3), dtype=np.uint8)
    path = write_demos(tmp_path / "d.hdf5", [{"frames": frames, "actions": a}], "push")
    (d,) = read_demos(path, drop_noops=True)
    np.testing.assert_array_equal(d.frames, frames[[0, 1, 2, 5, 6]])
    assert sorted(d.next_frames) == [2, 4]  # after kept steps 2 (file step 2) and 4 (file step 6)
    np.testing.assert_array_equal(d.next_frames[2], frames[3])
    np.testing.assert_array_equal(d.next_frames[4], frames[7])
    assert read_demos(path)[0].next_frames == {}
    # rotated frames: the frames led to are turned with them
    (r,) = read_demos(path, drop_noops=True, rotate_180=True)
    np.testing.assert_array_equal(r.next_frames[2], frames[3][::-1, ::-1])


def test_iter_demos_reads_only_the_demos_named_and_first_demo_shape_reads_no_frames(tmp_path, np_rng, monkeypatch):
    from worldvla.data import hdf5

    demos = [random_demo(np_rng, 3, 8, 8, 2, instruction="", success=False),
             random_demo(np_rng, 4, 6, 10, 3, instruction=""), random_demo(np_rng, 2, 4, 12, 3, instruction="")]
    demos[1].actions[:, :-1] = 0.0  # every step a no-op
    path = write_demos(tmp_path / "d.hdf5", demos, "push")
    read = []
    real = hdf5._read_dataset
    monkeypatch.setattr(hdf5, "_read_dataset", lambda g, key, where: read.append(key) or real(g, key, where))
    assert [d.name for d in iter_demos(path, names={"demo_2", "demo_7"})] == ["demo_2"]
    assert read == ["agentview_rgb", "actions"]
    read.clear()
    assert hdf5.first_demo_shape(path) == ((8, 8), 2)
    assert hdf5.first_demo_shape(path, only_success=True) == ((6, 10), 3)
    assert hdf5.first_demo_shape(path, only_success=True, drop_noops=True) == ((4, 12), 3)
    assert "agentview_rgb" not in read
    with h5py.File(path, "a") as f:
        del f["data/demo_0/actions"]
        f["data/demo_0/actions"] = np.zeros((2, 2), np.float32)
    with pytest.raises(DemoFormatError, match="demo_0: 3 frames but 2 actions"):
        hdf5.first_demo_shape(path, only_success=True)


def test_actions_are_binned_from_the_files_float64_values(tmp_path, np_rng):
    """The release bins the float64 values of LIBERO's files; a float32 round trip on the way moves values that
    lie within float32's rounding of a bin edge into the next bin."""
    from worldvla.tokens import ActionTokenizer, VocabLayout

    tok = ActionTokenizer(VocabLayout.chameleon())
    # Values a hair from the bin edges, where float32's rounding crosses them: of 400 such rows, 30 where it does
    # and 10 where it does not.
    edges = tok.edges[np_rng.integers(1, tok.n_bins - 1, (400, 7))]
    normalized = edges + np_rng.uniform(-1e-7, 1e-7, edges.shape)
    candidates = (normalized + 1.0) / 2.0 * (tok.high - tok.low + 1e-8) + tok.low
    crossed = (tok.bins(candidates) != tok.bins(candidates.astype(np.float32))).any(1)
    assert crossed.sum() >= 30 and (~crossed).sum() >= 10
    actions = np.concatenate([candidates[crossed][:30], candidates[~crossed][:10]])
    path = tmp_path / "libero_demo.hdf5"
    write_libero_like(path, np_rng, n=1)
    with h5py.File(path, "a") as f:  # demo_0 again, with these actions
        del f["data/demo_0"]
        g = f["data"].create_group("demo_0")
        g.create_dataset("obs/agentview_rgb", data=np_rng.integers(0, 256, (len(actions), 10, 12, 3), np.uint8))
        g.create_dataset("actions", data=actions)
        g.create_dataset("dones", data=np.eye(1, len(actions), len(actions) - 1, dtype=np.uint8)[0])
    (demo,) = list(iter_demos(path))
    np.testing.assert_array_equal(tok.bins(demo.actions), tok.bins(actions))
    (_, read), = list(iter_demo_actions(path))
    np.testing.assert_array_equal(tok.bins(read), tok.bins(actions))


def test_an_arm_action_of_exactly_the_threshold_is_kept():
    """A step is a no-op only when its arm action's norm is strictly below the threshold: an action whose
    norm equals it moves the arm and is kept, one just below it (gripper unchanged) is dropped."""
    a = np.zeros((3, 7), np.float64)
    a[:, -1] = -1                 # the gripper command never changes
    a[0, :6] = 0.5                # a kept step for the gripper to be compared against
    a[1, 0] = 1e-4                # norm exactly the threshold
    a[2, 0] = 0.99e-4             # norm just below it
    assert float(np.linalg.norm(a[1, :-1])) == 1e-4
    assert steps_without_noops(a, threshold=1e-4).tolist() == [0, 1]
    assert steps_without_noops(a).tolist() == [0, 1]


def test_a_done_flag_before_the_last_step_is_not_success(tmp_path, np_rng):
    """Without a `success` attribute a LIBERO demo's success is its last `dones` flag: a flag set partway
    (dones [0, 1, 0]) with the last one clear is a failed demo, [0, 0, 1] a successful one."""
    path = tmp_path / "libero.hdf5"
    write_libero_like(path, np_rng, n=2)  # demo_0 has 3 steps, demo_1 has 4
    with h5py.File(path, "a") as f:
        f["data/demo_0/dones"][...] = np.array([0, 1, 0], np.uint8)
        f["data/demo_1/dones"][...] = np.array([0, 0, 0, 1], np.uint8)
        assert not any("success" in f[f"data/demo_{i}"].attrs for i in range(2))
    assert [d.success for d in read_demos(path)] == [False, True]
    assert demo_file_info(path)["success"] == [False, True]


def _scripted_episodes(monkeypatch, fails=(), raises=()):
    """`collect`'s episodes (in this process, workers=1) as stand-ins: attempt a of episode e fails where (e, a) is
    in `fails` and raises where it is in `raises`; the others succeed with 3 frames whose pixels hold the seed."""
    from worldvla.data import collect as col

    def run_episode(job):
        key = (job["episode"], job["attempt"])
        if key in raises:
            raise RuntimeError("renderer lost")
        frames = np.full((3, 8, 8, 3), job["seed"] % 251, np.uint8)
        return {**job, "frames": frames, "actions": np.zeros((3, 4), np.float32), "success": key not in fails,
                "steps": 3, "seconds": 0.01, "setup_seconds": 0.0}

    monkeypatch.setattr(col, "run_episode", run_episode)
    return col


def test_collect_retries_failed_episodes_and_reports_what_it_kept(tmp_path, monkeypatch):
    """A failed attempt is retried on the next seed; the success rate is over every attempt; a task listed twice is
    collected once; an episode that failed every attempt makes the task incomplete (and the command exit 1)."""
    pytest.importorskip("metaworld")
    from worldvla.data.hdf5 import demo_file_info

    col = _scripted_episodes(monkeypatch, fails={(0, 0)})
    s = col.collect("reach-v3,reach-v3", 2, tmp_path, image_size=8, seed=5, max_attempts=2, progress=False)
    t = s["tasks"]["reach-v3"]
    assert list(s["tasks"]) == ["reach-v3"] and s["episodes_run"] == 3
    assert (t["episodes"], t["attempts"], t["mean_steps"]) == (2, 3, 3.0)
    assert t["expert_success_rate"] == pytest.approx(2 / 3)
    assert s["incomplete"] == [] and s["errors"] == []
    seeds = demo_file_info(tmp_path / "reach-v3.hdf5")["attrs"]["episode_seeds"]
    assert list(seeds) == [col.episode_seed(5, "reach-v3", 0, 1), col.episode_seed(5, "reach-v3", 1, 0)]

    col = _scripted_episodes(monkeypatch, fails={(0, 0)})
    s = col.collect(["push-v3"], 2, tmp_path, image_size=8, seed=5, max_attempts=1, progress=False)
    assert s["tasks"]["push-v3"]["episodes"] == 1 and s["incomplete"] == ["push-v3"]
    assert demo_file_info(tmp_path / "push-v3.hdf5")["num_demos"] == 1


def test_collect_counts_a_raised_attempt_as_an_error_and_retries_it(tmp_path, monkeypatch):
    pytest.importorskip("metaworld")
    col = _scripted_episodes(monkeypatch, raises={(1, 0)})
    s = col.collect(["reach-v3"], 2, tmp_path, image_size=8, seed=5, max_attempts=2, progress=False)
    assert s["tasks"]["reach-v3"]["episodes"] == 2 and s["tasks"]["reach-v3"]["attempts"] == 2
    assert s["errors"] == ["reach-v3 episode 1 attempt 0: RuntimeError: renderer lost"] and s["incomplete"] == []


def test_collect_removes_a_killed_writes_temporary_file_beside_a_finished_task_file(tmp_path, monkeypatch):
    """A task file already complete is not written again, so its writer's cleanup never runs: collect removes the
    temporary file a killed run left beside it itself."""
    pytest.importorskip("metaworld")
    col = _scripted_episodes(monkeypatch)
    col.collect(["reach-v3"], 1, tmp_path, image_size=8, progress=False)
    left = tmp_path / f".reach-v3.hdf5.tmp-{_dead_pid()}-0123456789ab"
    left.write_bytes(b"partial")
    s = col.collect(["reach-v3"], 1, tmp_path, image_size=8, progress=False)
    assert s["tasks"]["reach-v3"]["skipped"] and (s["tasks_skipped"], s["tasks_collected"]) == (1, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reach-v3.hdf5"]


@pytest.mark.parametrize("kw, match", [({"image_size": 7}, "--image-size must be at least 8 pixels, got 7"),
                                       ({"max_attempts": 0}, "max_attempts must be >= 1, got 0"),
                                       ({"action_noise": -0.1}, "action_noise must be >= 0, got -0.1"),
                                       ({"workers": 0}, "workers must be >= 1, got 0")])
def test_collect_called_from_python_refuses_bad_settings_before_any_episode(tmp_path, monkeypatch, kw, match):
    """The command line's types refuse these; `collect()` itself too (a negative noise was taken as none, and 0
    attempts as one)."""
    pytest.importorskip("metaworld")
    col = _scripted_episodes(monkeypatch, raises={(0, 0)})
    with pytest.raises(ValueError, match=match):
        col.collect(["reach-v3"], 1, tmp_path, progress=False, **{"image_size": 8, **kw})
    assert not (tmp_path / "reach-v3.hdf5").exists()


def test_collect_redoes_a_task_file_that_records_no_episode_seeds(tmp_path, monkeypatch):
    """A file with the same settings but without its episodes' seeds (written by hand, or by an older collect)
    cannot be told to hold episodes 0 .. n-1: it is collected again, not read as complete."""
    pytest.importorskip("metaworld")
    from worldvla.data.hdf5 import demo_file_info

    col = _scripted_episodes(monkeypatch)
    settings = col._settings(8, 5, "corner", 200, 0.0)
    rng = np.random.default_rng(0)
    write_demos(tmp_path / "reach-v3.hdf5", [random_demo(rng, 3, 8, 8, 4, instruction="") for _ in range(2)], "reach",
                attrs={**settings, "task": "reach-v3"})
    s = col.collect(["reach-v3"], 2, tmp_path, image_size=8, seed=5, progress=False)
    assert not s["tasks"]["reach-v3"]["skipped"] and s["episodes_run"] == 2
    assert list(demo_file_info(tmp_path / "reach-v3.hdf5")["attrs"]["episode_seeds"]) == [
        col.episode_seed(5, "reach-v3", e, 0) for e in range(2)]


def test_an_episode_records_each_frame_before_its_action_and_clips_noisy_actions(tmp_path):
    """frames[t] is what the expert saw when it chose actions[t] (the reset frame first), and the noise is added
    before clipping to the action range [-1, 1]."""
    pytest.importorskip("metaworld")
    from worldvla.data import collect as col
    from worldvla.sim.metaworld_env import make_env

    job = {"task": "reach-v3", "image_size": 16, "camera": "corner", "max_steps": 6, "noise": 2.0, "seed": 123,
           "episode": 0, "attempt": 0}
    try:
        r = col.run_episode(job)
        again = col.run_episode(job)
    finally:
        col._close_envs()
    env = make_env("reach-v3", seed=0, image_size=16, camera="corner", max_steps=6)
    try:
        first = env.reset(seed=123)
    finally:
        env.close()
    assert np.array_equal(r["frames"][0], first)
    assert len(r["frames"]) == len(r["actions"]) == r["steps"] == 6
    assert np.abs(r["actions"]).max() <= 1.0 and (np.abs(r["actions"]) == 1.0).any()
    assert np.array_equal(r["actions"], again["actions"]) and np.array_equal(r["frames"], again["frames"])


def test_the_action_noise_of_each_episode_follows_its_seed(monkeypatch):
    """Each episode draws its noise from its own seed (the same seed, the same noise; another seed, other noise),
    not one sequence that every episode repeats."""
    pytest.importorskip("metaworld")
    from worldvla.data import collect as col
    from worldvla.sim import metaworld_env

    monkeypatch.setattr(metaworld_env, "expert_policy", lambda task: lambda state: np.zeros(4))  # noise alone
    job = {"task": "reach-v3", "image_size": 8, "camera": "corner", "max_steps": 4, "noise": 0.3, "episode": 0,
           "attempt": 0}
    try:
        a, b, a2 = (col.run_episode({**job, "seed": seed})["actions"] for seed in (1, 2, 1))
    finally:
        col._close_envs()
    assert a.shape == (4, 4) and np.array_equal(a, a2) and not np.array_equal(a, b)
    assert np.array_equal(a, np.clip(np.random.default_rng(1).normal(0.0, 0.3, (4, 4)), -1, 1).astype(np.float32))


def test_a_folder_given_for_a_demo_file_is_named_with_the_files_in_it(tmp_path, np_rng):
    """A folder of demo files where one file is read said "no demo file at <folder>", as if nothing were there. It
    is named as a folder now, with (a few of) the demo files in it to give instead."""
    folder = tmp_path / "demos"
    for name in ("a.hdf5", "b.h5", "c.hdf5", "d.hdf5", "e.hdf5", "f.hdf5"):
        write_demos(folder / name, [random_demo(np_rng, 4, 8, 8, 7, instruction="")], "push")
    (folder / "notes.txt").write_text("not a demo file\n")
    for read in (demo_file_info, read_demos, lambda p: next(iter_demos(p))):
        with pytest.raises(IsADirectoryError, match=re.escape(
                f"{folder} is a folder, not a demo file; give one of the demo files in it: a.hdf5, b.h5, c.hdf5, "
                f"d.hdf5 and 2 more")):
            read(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(IsADirectoryError, match=f"{empty} is a folder, not a demo file, and holds no .hdf5/.h5 file"):
        read_demos(empty)


def test_a_folder_for_a_demo_file_names_its_files_only_and_counts_the_rest_from_five(tmp_path, np_rng):
    """The files named are demo files: a subfolder named like one is not offered. Four files are all named; a fifth
    is counted as "and 1 more"."""
    folder = tmp_path / "demos"
    (folder / "older.hdf5").mkdir(parents=True)  # a folder, not a file to give
    with pytest.raises(IsADirectoryError, match=f"{folder} is a folder, not a demo file, and holds no .hdf5/.h5 file"):
        read_demos(folder)
    for name in ("a.hdf5", "b.hdf5", "c.hdf5", "d.hdf5"):
        write_demos(folder / name, [random_demo(np_rng, 4, 8, 8, 7, instruction="")], "push")
    with pytest.raises(IsADirectoryError) as e:
        read_demos(folder)
    assert str(e.value).endswith("give one of the demo files in it: a.hdf5, b.hdf5, c.hdf5, d.hdf5"), str(e.value)
    write_demos(folder / "e.hdf5", [random_demo(np_rng, 4, 8, 8, 7, instruction="")], "push")
    with pytest.raises(IsADirectoryError) as e:
        read_demos(folder)
    assert str(e.value).endswith("in it: a.hdf5, b.hdf5, c.hdf5, d.hdf5 and 1 more"), str(e.value)


def test_a_write_under_way_keeps_its_temporary_file_when_stale_ones_are_removed(tmp_path, np_rng):
    """`remove_stale_temps` removes this process's temporary files of `path` (an earlier process of the same pid
    left them), except those of `write_demos` calls still writing: removing one broke that write at its rename."""
    from worldvla.data.hdf5 import remove_stale_temps

    path = tmp_path / "reach-v3.hdf5"
    removed = []

    def demos():
        yield random_demo(np_rng, 2, 4, 4, 2, instruction="")
        removed.extend(remove_stale_temps(path))  # while the write is under way (collect does so per task)
        yield random_demo(np_rng, 3, 4, 4, 2, instruction="")

    write_demos(path, demos(), "reach")
    assert removed == []
    assert [len(d.actions) for d in read_demos(path)] == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reach-v3.hdf5"]


def test_write_demos_refuses_an_empty_demo_by_name(tmp_path, np_rng):
    """A demo of no step (an episode that ended before its first action) is refused naming it, and no file is left
    behind: the reader refuses such a demo, so writing it would only move the error to the training run."""
    good = random_demo(np_rng, 3, 8, 8, 4, instruction="")
    empty = {"frames": np.zeros((0, 8, 8, 3), np.uint8), "actions": np.zeros((0, 4), np.float32)}
    with pytest.raises(ValueError, match="demo 1: need one frame per action and at least one step, got 0 frames"):
        write_demos(tmp_path / "d.hdf5", [good, empty], "push")
    assert not any(tmp_path.iterdir())


def test_write_demos_records_the_layouts_done_flags_and_demo_count(tmp_path, np_rng):
    """The file follows the LIBERO / robomimic layout other readers rely on: each demo's `dones` holds 1 on its
    last step only, and `data.attrs` count the demos and their steps."""
    lengths = [1, 4, 2]
    demos = [random_demo(np_rng, t, 6, 6, 3, instruction="") for t in lengths]
    path = write_demos(tmp_path / "d.hdf5", demos, "push")
    with h5py.File(path, "r") as f:
        for i, t in enumerate(lengths):
            np.testing.assert_array_equal(f[f"data/demo_{i}/dones"][()], np.eye(1, t, t - 1, dtype=np.uint8)[0])
            assert f[f"data/demo_{i}"].attrs["num_samples"] == t
        assert f["data"].attrs["num_demos"] == 3
        assert f["data"].attrs["total"] == 7
    assert demo_file_info(path)["attrs"]["num_demos"] == 3


def test_only_groups_named_demo_and_a_number_are_read_as_demos(tmp_path, np_rng):
    """A group beside the demos whose name only starts like one ("demo_1_backup", a copy kept in the file) is not
    a demo: it is neither read nor counted, and does not take demo_1's place in the order."""
    demos = [random_demo(np_rng, 2 + i, 6, 6, 3, instruction="") for i in range(2)]
    path = write_demos(tmp_path / "d.hdf5", demos, "push")
    with h5py.File(path, "a") as f:
        f.copy(f["data/demo_0"], f["data"], name="demo_1_backup")
    assert [d.name for d in read_demos(path)] == ["demo_0", "demo_1"]
    assert [len(d) for d in read_demos(path)] == [2, 3]
    info = demo_file_info(path)
    assert info["num_demos"] == 2 and info["names"] == ["demo_0", "demo_1"]
    assert [name for name, _ in iter_demo_actions(path)] == ["demo_0", "demo_1"]


def test_iter_demo_actions_skips_a_demo_of_no_ops_as_iter_demos_does(tmp_path, np_rng):
    """Under drop_noops a demo whose every step is a no-op yields nothing from `iter_demo_actions`, as `iter_demos`
    skips it: the action bounds are then derived from the demos the store tokenizes, not from an empty one."""
    still = np.zeros((3, 7), np.float32)
    still[:, -1] = -1
    moving = np_rng.uniform(-1, 1, (4, 7)).astype(np.float32)
    frames = np_rng.integers(0, 256, size=(7, 8, 8, 3), dtype=np.uint8)
    path = write_demos(tmp_path / "d.hdf5", [{"frames": frames[:3], "actions": still},
                                             {"frames": frames[3:], "actions": moving}], "push")
    got = list(iter_demo_actions(path, drop_noops=True))
    assert [name for name, _ in got] == ["demo_1"]
    np.testing.assert_array_equal(got[0][1], moving)
    with pytest.warns(UserWarning, match="every step is a no-op"):
        assert [d.name for d in iter_demos(path, drop_noops=True)] == ["demo_1"]
    assert [name for name, _ in iter_demo_actions(path)] == ["demo_0", "demo_1"]


def test_float_frames_reaching_exactly_one_are_advised_as_zero_to_one_images(tmp_path):
    """A [0, 1] float image whose white pixels are exactly 1.0 (the usual case) gets the [0, 1] advice: the [-1, 1]
    one, ((x + 1) * 127.5), would map its black to mid-grey."""
    x = np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32)
    x[0, 0, 0] = 1.0
    x[0, 0, 1] = 0.0
    with pytest.raises(ValueError, match=re.escape("they lie in [0, 1]: convert with (x * 255).round()")) as e:
        write_demos(tmp_path / "a.hdf5", [{"frames": x, "actions": np.zeros((2, 4), np.float32)}], "x")
    assert "127.5" not in str(e.value)


def test_a_libero_instruction_kept_as_a_list_of_words_is_read_as_one_text(tmp_path, np_rng):
    """problem_info's language_instruction kept as a list of words is read as the words joined by spaces, not as
    the list's printed form."""
    path = tmp_path / "libero.hdf5"
    write_libero_like(path, np_rng, n=1)
    with h5py.File(path, "a") as f:
        f["data"].attrs["problem_info"] = json.dumps({"language_instruction": ["open", "the", "top", "drawer"]})
    assert [d.instruction for d in read_demos(path)] == ["open the top drawer"]
    assert demo_file_info(path)["instruction"] == "open the top drawer"


def test_without_a_camera_the_agentview_frames_are_read_before_other_cameras(tmp_path, np_rng):
    """With no camera named, a demo's agentview frames are read even where another camera's key sorts first
    ("Front_rgb" before "agentview_rgb"); naming the camera reads that one."""
    demo = random_demo(np_rng, 3, 6, 6, 2, instruction="")
    path = write_demos(tmp_path / "d.hdf5", [demo], "push", camera="agentview")
    front = np_rng.integers(0, 256, size=(3, 6, 6, 3), dtype=np.uint8)
    with h5py.File(path, "a") as f:
        f["data/demo_0/obs/Front_rgb"] = front
    np.testing.assert_array_equal(read_demos(path)[0].frames, demo.frames)
    np.testing.assert_array_equal(read_demos(path, camera="Front")[0].frames, front)


def test_reading_record_names_only_the_demo_instructions_that_differ(tmp_path, np_rng):
    """A token store's record of a file lists the demos whose own instruction differs from the file's (not every
    demo, which `write_demos` gives the file's instruction too), and says whether some demo takes the file's: a
    demo without one does; a file whose demos all hold their own needs no instruction of its own."""
    from worldvla.data.hdf5 import FROM_NOWHERE, reading_record

    demos = [random_demo(np_rng, 2, 6, 6, 2, instruction="") for _ in range(3)]
    demos[1].instruction = "close the drawer"
    path = write_demos(tmp_path / "d.hdf5", demos, "open the drawer")
    record = reading_record(path)
    assert record["instruction"] == "open the drawer" and not record["uses_file_instruction"]
    assert record["demo_instructions"] == {"demo_1": "close the drawer"}
    same = write_demos(tmp_path / "same.hdf5", demos[:1], "open the drawer")
    assert "demo_instructions" not in reading_record(same)
    with h5py.File(path, "a") as f:
        del f["data/demo_2"].attrs["instruction"]
    assert reading_record(path)["uses_file_instruction"]
    with h5py.File(path, "a") as f:  # every demo with its own instruction, the file with none
        del f["data"].attrs["instruction"]
        f["data/demo_0"].attrs["instruction"] = "push the drawer"
        f["data/demo_2"].attrs["instruction"] = "open the drawer"
    record = reading_record(path)
    assert record["instruction_from"] == FROM_NOWHERE and not record["uses_file_instruction"]
    assert record["demo_instructions"] == {"demo_0": "push the drawer", "demo_1": "close the drawer",
                                           "demo_2": "open the drawer"}


def test_iter_demos_given_no_names_yields_no_demo(tmp_path, np_rng):
    """`names` picks the demos read: an empty set picks none (not every demo)."""
    path = write_demos(tmp_path / "d.hdf5", [random_demo(np_rng, 2, 6, 6, 2, instruction="")], "push")
    assert list(iter_demos(path, names=set())) == []
    assert [d.name for d in iter_demos(path, names=["demo_0"])] == ["demo_0"]


def test_write_demos_stores_actions_as_float32_whatever_they_are_given_as(tmp_path, np_rng):
    """The layout's actions are float32 [T, D]: float64 actions (a mapping demo's, a simulator's) are stored as
    float32, so that every collected file holds the same values a reader bins."""
    actions = np_rng.uniform(-1, 1, (3, 4))  # float64
    frames = np_rng.integers(0, 256, size=(3, 6, 6, 3), dtype=np.uint8)
    path = write_demos(tmp_path / "d.hdf5", [{"frames": frames, "actions": actions}], "push")
    with h5py.File(path, "r") as f:
        stored = f["data/demo_0/actions"]
        assert stored.dtype == np.float32
        np.testing.assert_array_equal(stored[()], actions.astype(np.float32))


@pytest.mark.parametrize("camera", ["", "agentview/left"])
def test_write_demos_refuses_a_camera_that_is_not_a_plain_name(tmp_path, np_rng, camera):
    """A camera name holding "/" would write the frames one group deeper (obs/agentview/left_rgb), where no reader
    finds them; an empty one would write obs/_rgb. Refused before any file is written."""
    with pytest.raises(ValueError, match="camera must be a plain name like 'agentview'"):
        write_demos(tmp_path / "d.hdf5", [random_demo(np_rng, 2, 4, 4, 2, instruction="")], "push", camera=camera)
    assert not any(tmp_path.iterdir())


def test_write_demos_refuses_frames_that_are_not_rgb(tmp_path, np_rng):
    """RGBA frames [T, H, W, 4] (a renderer's default) are refused naming their shape, not written for every
    reader to refuse later."""
    frames = np_rng.integers(0, 256, size=(2, 6, 6, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match=re.escape("demo 0: frames must have shape [T, H, W, 3], got (2, 6, 6, 4)")):
        write_demos(tmp_path / "d.hdf5", [{"frames": frames, "actions": np.zeros((2, 3))}], "push")
    assert not any(tmp_path.iterdir())


def test_demos_of_another_kind_are_refused_naming_what_is_expected(tmp_path, np_rng):
    """A mapping demo without its actions, a (frames, actions) tuple and an instruction that is not a text are
    refused with what a demo (or the instruction) must be, and no file is left behind."""
    d = random_demo(np_rng, 2, 4, 4, 2, instruction="")
    with pytest.raises(ValueError, match=re.escape("demo 1: a mapping demo needs keys 'frames' and 'actions', "
                                                   "missing ['actions']")):
        write_demos(tmp_path / "d.hdf5", [d, {"frames": d.frames}], "push")
    with pytest.raises(TypeError, match="demo 0: expected a Demo or a mapping with 'frames' and 'actions', got tuple"):
        write_demos(tmp_path / "d.hdf5", [(d.frames, d.actions)], "push")
    with pytest.raises(TypeError, match="instruction must be a string, got NoneType"):
        write_demos(tmp_path / "d.hdf5", [d], None)
    assert not any(tmp_path.iterdir())


def test_a_camera_is_found_by_its_full_key_and_without_agentview_the_first_camera_is_read(tmp_path, np_rng):
    """camera names a camera (`front` for obs/front_rgb or obs/front_image) or its key itself (`front_rgb`, or a key
    without a suffix). Without a camera and without agentview frames, the first camera key in sorted order is read,
    robomimic's `<camera>_image` keys as well as LIBERO's `<camera>_rgb`."""
    cams = {name: np_rng.integers(0, 256, size=(2, 6, 6, 3), dtype=np.uint8)
            for name in ("sideview_image", "robot0_eye_in_hand_image", "overhead")}
    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        f.create_group("data").attrs["instruction"] = "lift"
        for name, frames in cams.items():
            f[f"data/demo_0/obs/{name}"] = frames
        f["data/demo_0/obs/object"] = np.zeros((2, 10), np.float32)
        f["data/demo_0/actions"] = np.zeros((2, 7), np.float32)
    np.testing.assert_array_equal(read_demos(path)[0].frames, cams["robot0_eye_in_hand_image"])
    np.testing.assert_array_equal(read_demos(path, camera="sideview")[0].frames, cams["sideview_image"])
    np.testing.assert_array_equal(read_demos(path, camera="sideview_image")[0].frames, cams["sideview_image"])
    np.testing.assert_array_equal(read_demos(path, camera="overhead")[0].frames, cams["overhead"])


@pytest.mark.parametrize("frames, said", [(np.zeros((2, 6, 6, 3), np.float32), "float32 (2, 6, 6, 3)"),
                                          (np.zeros((2, 6, 6, 4), np.uint8), "uint8 (2, 6, 6, 4)")])
def test_frames_stored_as_floats_or_with_four_channels_are_refused_by_the_readers(tmp_path, frames, said):
    """A file written by another tool with float frames or RGBA frames is refused naming the demo and what its
    frames are, by `iter_demos` and by `first_demo_shape` (which reads no frames), instead of being tokenized."""
    from worldvla.data.hdf5 import first_demo_shape

    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        f.create_group("data").attrs["instruction"] = "push"
        f["data/demo_0/obs/agentview_rgb"] = frames
        f["data/demo_0/actions"] = np.zeros((2, 3), np.float32)
    match = re.escape(f"{path}:data/demo_0: frames must be uint8 [T, H, W, 3], got {said}")
    with pytest.raises(DemoFormatError, match=match):
        read_demos(path)
    with pytest.raises(DemoFormatError, match=match):
        first_demo_shape(path)


def test_iter_demo_actions_reads_only_successful_demos_and_names_the_first_step_not_finite(tmp_path, np_rng):
    """only_success leaves out the failed demos' actions (the action bounds are derived from the demos a store
    keeps); actions that are not finite are refused naming the demo and the first such step."""
    demos = [random_demo(np_rng, 3, 4, 4, 2, instruction="", success=ok) for ok in (False, True, False, True)]
    path = write_demos(tmp_path / "d.hdf5", demos, "push")
    got = list(iter_demo_actions(path, only_success=True))
    assert [name for name, _ in got] == ["demo_1", "demo_3"]
    np.testing.assert_array_equal(got[1][1], demos[3].actions)
    assert [name for name, _ in iter_demo_actions(path)] == ["demo_0", "demo_1", "demo_2", "demo_3"]
    with h5py.File(path, "a") as f:
        f["data/demo_3/actions"][2, 0] = np.nan
        f["data/demo_3/actions"][1, 1] = np.inf
    with pytest.raises(DemoFormatError, match=re.escape(f"{path}:data/demo_3: actions contain NaN or inf (first at "
                                                        f"step 1 of 3)")):
        list(iter_demo_actions(path, only_success=True))


def test_an_error_of_the_readers_own_code_is_not_taken_for_a_damaged_file(tmp_path, np_rng, monkeypatch):
    """Only h5py's errors in reading a file's structure are said to be damage: a KeyError raised by the reader's
    own code (a bug) keeps its kind and message, not "the file is damaged, collect it again"."""
    from worldvla.data import hdf5

    path = write_demos(tmp_path / "d.hdf5", [random_demo(np_rng, 3, 4, 4, 2, instruction="")], "push")

    def success(g):
        raise KeyError("no such setting")

    monkeypatch.setattr(hdf5, "_demo_success", success)
    for read in (read_demos, demo_file_info):
        with pytest.raises(KeyError, match="no such setting"):
            read(path)


def test_a_no_op_is_judged_by_the_norm_of_the_whole_arm_action():
    """The arm action's Euclidean norm is compared with the threshold, as the release's regeneration does: small
    moves on several axes (each below the threshold, their norm above it) are kept; a norm below it is dropped."""
    a = np.zeros((3, 7), np.float64)
    a[:, -1] = 1
    a[0, :6] = 0.5
    a[1, :3] = 6e-5  # norm 1.04e-4
    a[2, :2] = 6e-5  # norm 0.85e-4
    assert steps_without_noops(a).tolist() == [0, 1]


def test_turned_frames_are_contiguous_arrays(tmp_path, np_rng):
    """LIBERO's frames turned to the release's view are contiguous copies, not views with negative strides (which
    torch.from_numpy refuses), for the rotated and the mirrored conventions alike."""
    path = tmp_path / "libero.hdf5"
    raw = write_libero_like(path, np_rng, n=1)[0]
    for convention in ("opengl", "opencv"):
        with h5py.File(path, "a") as f:
            f["data"].attrs["macros_image_convention"] = convention
        (d,) = read_demos(path)
        assert d.frames.flags.c_contiguous and d.frames.strides[1:] == (12 * 3, 3, 1)
        want = raw[:, ::-1, ::-1] if convention == "opengl" else raw[:, :, ::-1]
        np.testing.assert_array_equal(d.frames, want)


def test_episode_seeds_keep_their_values_so_that_earlier_files_stay_complete():
    """A task file records its episodes' seeds, and a rerun takes it as complete only when they are the seeds of
    episodes 0 .. n-1: seeds that changed (another order of (episode, attempt), another mixing) would collect every
    earlier file again. An episode's seed on its attempt a is not the seed of episode a on that episode's number."""
    from worldvla.data.collect import episode_seed

    assert episode_seed(7, "push-v3", 3, 1) == 8540570
    assert episode_seed(7, "push-v3", 1, 3) == 1895281083
    assert episode_seed(0, "reach-v3", 0, 0) == 567848536
    assert episode_seed(2**32 - 1, "reach-v3", 49, 4) == 937997510


def test_episodes_of_other_step_limits_in_one_process_each_end_at_their_own(monkeypatch):
    """The envs kept for reuse in a process are told apart by their step limit too: an episode of max_steps 3 after
    one of 5 (two collections in one process) ran to the first env's limit."""
    pytest.importorskip("metaworld")
    from worldvla.data import collect as col
    from worldvla.sim import metaworld_env

    monkeypatch.setattr(metaworld_env, "expert_policy", lambda task: lambda state: np.zeros(4))  # never succeeds
    job = {"task": "reach-v3", "image_size": 8, "camera": "corner", "noise": 0.0, "seed": 1, "episode": 0,
           "attempt": 0}
    try:
        steps = [col.run_episode({**job, "max_steps": n})["steps"] for n in (5, 3, 5)]
    finally:
        col._close_envs()
    assert steps == [5, 3, 5]


@pytest.mark.parametrize("key", ["instruction", "num_demos", "total", "camera", "upright"])
def test_write_demos_refuses_extra_attributes_that_would_replace_its_own(tmp_path, np_rng, key):
    """`attrs` adds attributes to the `data` group; one named like those write_demos writes itself replaced it
    silently: a count that is not the file's, another instruction than the demos', or upright False, which turned
    upright frames upside down on reading. Refused naming the key, before any file is written."""
    demos = [random_demo(np_rng, 2, 4, 4, 2, instruction="")]
    with pytest.raises(ValueError, match=rf"attrs may not set {key!r}, which write_demos writes itself"):
        write_demos(tmp_path / "d.hdf5", demos, "push", attrs={"task": "push-v3", key: 0})
    assert not any(tmp_path.iterdir())
    path = write_demos(tmp_path / "d.hdf5", demos, "push", attrs={"task": "push-v3"})
    assert demo_file_info(path)["attrs"]["task"] == "push-v3"


@pytest.mark.parametrize("kw, said", [({"image_size": 16}, "--image-size 16, not 8"), ({"seed": 6}, "--seed 6, not 5"),
                                      ({"camera": "topview"}, "--camera topview, not corner"),
                                      ({"max_steps": 100}, "--max-steps 100, not 200"),
                                      ({"action_noise": 0.1}, "--noise 0.1, not 0.0")])
def test_collect_refuses_a_task_file_of_any_other_setting(tmp_path, monkeypatch, kw, said):
    """Every recorded setting is compared: a file collected with another step limit or camera holds other
    episodes than this command's, as one of another size, seed or noise does."""
    pytest.importorskip("metaworld")
    col = _scripted_episodes(monkeypatch)
    other = {"image_size": 8, "seed": 5, "camera": "corner", "max_steps": 200, "action_noise": 0.0, **kw}
    col.collect(["reach-v3"], 1, tmp_path, progress=False, **other)
    with pytest.raises(FileExistsError, match=re.escape(f"other settings ({said}); pass --overwrite")):
        col.collect(["reach-v3"], 1, tmp_path, image_size=8, seed=5, progress=False)


def _foreign_file(path, kind: str) -> None:
    """A file at `path` that collect cannot read as a demo file."""
    if kind == "not HDF5":
        path.write_bytes(b"not an HDF5 file")
    elif kind == "another layout":  # someone's own data, named like a task
        with h5py.File(path, "w") as f:
            f["images"] = np.zeros((2, 4, 4, 3), np.uint8)
    else:  # cut short: a copy that stopped partway
        write_demos(path, [random_demo(np.random.default_rng(0), 3, 8, 8, 4, instruction="")], "reach")
        path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.parametrize("kind, said", [("not HDF5", "not an HDF5 file"),
                                        ("another layout", "no 'data' group"),
                                        ("cut short", "may be damaged or cut short")])
def test_collect_replaces_a_task_file_it_cannot_read_only_with_overwrite(tmp_path, monkeypatch, kind, said):
    """A task file that cannot be read holds no earlier run's episodes, since write_demos writes whole files: it
    is another tool's file named like a task, or one damaged since. It was replaced silently; now it is refused
    without --overwrite, naming it and why, before any episode runs, and replaced with it."""
    pytest.importorskip("metaworld")
    col = _scripted_episodes(monkeypatch)
    path = tmp_path / "reach-v3.hdf5"
    _foreign_file(path, kind)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=rf"^{re.escape(str(path))} is not a task file collect can read "
                                              rf"\(.*{said}.*\); .*pass --overwrite to replace it"):
        col.collect(["reach-v3"], 2, tmp_path, image_size=8, seed=5, progress=False)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["reach-v3.hdf5"]
    s = col.collect(["reach-v3"], 2, tmp_path, image_size=8, seed=5, progress=False, overwrite=True)
    assert not s["tasks"]["reach-v3"]["skipped"] and s["episodes_run"] == 2
    assert demo_file_info(path)["num_demos"] == 2


def test_collect_cut_to_fewer_episodes_counts_the_episodes_it_keeps(tmp_path, monkeypatch):
    """A task file cut to its first episodes records their count and steps, not those of the file it was cut from,
    and keeps the collection settings and instruction."""
    pytest.importorskip("metaworld")
    col = _scripted_episodes(monkeypatch)
    col.collect(["reach-v3"], 3, tmp_path, image_size=8, seed=5, progress=False)
    s = col.collect(["reach-v3"], 2, tmp_path, image_size=8, seed=5, progress=False)
    assert s["tasks"]["reach-v3"]["skipped"] and s["episodes_run"] == 0
    info = demo_file_info(tmp_path / "reach-v3.hdf5")
    assert info["num_demos"] == 2 and info["steps"] == [3, 3]
    attrs = info["attrs"]
    assert (attrs["num_demos"], attrs["total"], attrs["camera"], attrs["upright"]) == (2, 6, "agentview", True)
    from worldvla.sim import TASKS

    assert attrs["task"] == "reach-v3" and attrs["seed"] == 5 and info["instruction"] == TASKS["reach-v3"]


def test_collects_summary_lists_the_tasks_in_the_order_given(tmp_path, monkeypatch):
    """The summary (and the lines `worldvla collect` prints from it) follow the tasks' order as given, the tasks
    skipped as complete among them, not those first."""
    pytest.importorskip("metaworld")
    col = _scripted_episodes(monkeypatch)
    col.collect(["reach-v3"], 1, tmp_path, image_size=8, seed=5, progress=False)
    s = col.collect(["push-v3", "reach-v3", "drawer-open-v3"], 1, tmp_path, image_size=8, seed=5, progress=False)
    assert list(s["tasks"]) == ["push-v3", "reach-v3", "drawer-open-v3"]
    assert [t["skipped"] for t in s["tasks"].values()] == [False, True, False]


def _finished_summary(out):
    return {"tasks": {"reach-v3": {"skipped": True, "episodes": 1, "path": str(out / "reach-v3.hdf5")}},
            "episodes_run": 0, "seconds": 0.1, "seconds_per_episode": 0.0, "out_dir": str(out), "errors": [],
            "incomplete": []}


def test_collects_sigterm_handler_is_set_only_while_it_collects_and_not_outside_the_main_thread(tmp_path,
                                                                                               monkeypatch):
    """`run` sets its SIGTERM handler for the collection and puts the one before it back (a program calling it
    keeps its own); called from another thread, where no handler can be set, it collects without one."""
    import argparse
    import signal
    import threading

    from worldvla.data import collect as col

    seen = []
    monkeypatch.setattr(col, "collect", lambda *a, **k: seen.append(signal.getsignal(signal.SIGTERM))
                        or _finished_summary(tmp_path))
    args = col.add_arguments(argparse.ArgumentParser()).parse_args(["--out", str(tmp_path), "--tasks", "reach-v3"])

    def own(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, own)
    try:
        assert col.run(args) == 0
        assert seen == [col._terminated] and signal.getsignal(signal.SIGTERM) is own
        rc = []
        t = threading.Thread(target=lambda: rc.append(col.run(args)))
        t.start()
        t.join(timeout=30)
        assert rc == [0] and seen[1] is own and signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, before)


def test_collect_tasks_given_as_text_are_split_trimmed_and_all_names_every_task():
    pytest.importorskip("metaworld")
    from worldvla.sim import task_list
    from worldvla.sim import TASKS

    assert task_list(" reach-v3, push-v3,,reach-v3 ,") == ["reach-v3", "push-v3"]
    assert task_list("all") == list(TASKS) and len(TASKS) > 10
    with pytest.raises(ValueError, match="no tasks given"):
        task_list(" , ")


def test_collect_with_workers_skips_complete_task_files_without_starting_a_pool(tmp_path, monkeypatch):
    """A rerun of a finished collection with several workers (the default is the CPU count) has no episode to run:
    it skips every task file instead of starting a pool of no workers."""
    pytest.importorskip("metaworld")
    col = _scripted_episodes(monkeypatch)
    col.collect(["reach-v3", "push-v3"], 1, tmp_path, image_size=8, seed=5, progress=False)
    monkeypatch.setattr(col, "ProcessPoolExecutor", lambda *a, **k: pytest.fail("a pool was started"))
    s = col.collect(["reach-v3", "push-v3"], 1, tmp_path, image_size=8, seed=5, workers=4, progress=False)
    assert (s["tasks_skipped"], s["episodes_run"], s["incomplete"], s["errors"]) == (2, 0, [], [])


@pytest.mark.parametrize("env_args", ['["PickPlaceCan"]', '"PickPlaceCan"', "{not json"])
def test_a_robomimic_file_whose_env_args_name_no_env_is_read_without_an_instruction(tmp_path, np_rng, env_args):
    """env_args that are not a JSON object (another tool's file) name no task: the file is read with no instruction
    (FROM_NOWHERE, for --instruction to give), not refused with an AttributeError."""
    from worldvla.data.hdf5 import FROM_NOWHERE, reading_record

    path = tmp_path / "image.hdf5"
    write_libero_like(path, np_rng, n=1, key="agentview_image")
    with h5py.File(path, "a") as f:
        del f["data"].attrs["problem_info"]
        del f["data/demo_0/obs/eye_in_hand_rgb"]
        f["data"].attrs["env_args"] = env_args
    assert read_demos(path)[0].instruction == ""
    assert reading_record(path)["instruction_from"] == FROM_NOWHERE
    assert demo_file_info(path)["instruction_from"] == FROM_NOWHERE
    assert read_demos(path, instruction="lift the can")[0].instruction == "lift the can"


@pytest.mark.parametrize("blank", ["", "   ", b"push"])
def test_a_blank_instruction_given_to_the_readers_is_refused(tmp_path, np_rng, blank):
    """`instruction=` prompts every demo of the file: an empty or whitespace-only one (or bytes, as HDF5 returns
    text) was taken, and every demo then trained on a prompt without a task."""
    from worldvla.data.hdf5 import reading_record

    path = write_demos(tmp_path / "d.hdf5", [random_demo(np_rng, 2, 4, 4, 2, instruction="")], "push")
    with pytest.raises(ValueError, match=r"instruction= prompts every demo of the file, got .*: pass the task's"):
        read_demos(path, instruction=blank)
    with pytest.raises(ValueError, match=r"instruction= prompts every demo of the file"):
        reading_record(path, instruction=blank)
    assert [d.instruction for d in read_demos(path, instruction="open")] == ["open"]
    assert reading_record(path, instruction="open")["instruction"] == "open"


def test_write_demos_refuses_actions_beyond_the_float32_range_it_stores(tmp_path):
    """Finite float64 actions beyond float32's range were checked before the cast and stored as inf, which every
    reader then refuses (or, read by iter_demos, passed on as inf)."""
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match=r"demo 0: actions reach 1e\+39, beyond the float32 range"):
        write_demos(tmp_path / "d.hdf5", [{"frames": frames, "actions": np.full((2, 3), 1e39)}], "push")
    assert list(tmp_path.iterdir()) == []
    big = np.full((2, 3), 3e38)  # within float32's range: kept
    back = read_demos(write_demos(tmp_path / "d.hdf5", [{"frames": frames, "actions": big}], "push"))[0]
    assert np.array_equal(back.actions, big.astype(np.float32))


@pytest.mark.parametrize("frames_shape, actions, match", [
    ((2, 0, 4, 3), np.zeros((2, 3)), "demo 0: frames of 0x4 pixels hold no image"),
    ((2, 4, 0, 3), np.zeros((2, 3)), "demo 0: frames of 4x0 pixels hold no image"),
    ((2, 4, 4, 3), np.zeros((2, 0)), r"demo 0: actions of shape \(2, 0\) have no dimension"),
    ((2, 4, 4, 3), np.array([["a"], ["b"]]), "demo 0: actions must be numbers, got dtype <U1"),
])
def test_write_demos_refuses_empty_frames_or_actions_and_actions_that_are_not_numbers(tmp_path, frames_shape,
                                                                                     actions, match):
    """Frames of no pixel failed in h5py's chunking ("All chunk dimensions must be positive"), text actions in
    numpy's isfinite, neither naming the demo; actions of no dimension were written, and read back as demos whose
    every step is a no-op."""
    demo = {"frames": np.zeros(frames_shape, np.uint8), "actions": actions}
    with pytest.raises(ValueError, match=match):
        write_demos(tmp_path / "d.hdf5", [demo], "push")
    assert list(tmp_path.iterdir()) == []


def test_the_readers_refuse_a_demo_whose_actions_have_no_dimension(tmp_path):
    from worldvla.data.hdf5 import first_demo_shape

    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        f["data/demo_0/obs/agentview_rgb"] = np.zeros((3, 4, 4, 3), np.uint8)
        f["data/demo_0/actions"] = np.zeros((3, 0), np.float32)
    said = r"data/demo_0: actions must be \[T, D\] \(one row per step, D >= 1\), got shape \(3, 0\)"
    for read in (lambda: read_demos(path), lambda: read_demos(path, drop_noops=True), lambda: first_demo_shape(path)):
        with pytest.raises(DemoFormatError, match=said):
            read()


def test_write_demos_refuses_an_attribute_h5py_cannot_store_before_reading_any_demo(tmp_path, np_rng):
    """An `attrs` value h5py cannot store failed with h5py's bare TypeError after every demo had been written."""
    taken = []

    def demos():
        for _ in range(2):
            taken.append(1)
            yield random_demo(np_rng, 2, 4, 4, 3, instruction="")

    with pytest.raises(ValueError, match=r"attrs\['note'\] = None cannot be stored as an HDF5 attribute"):
        write_demos(tmp_path / "d.hdf5", demos(), "push", attrs={"episode_seeds": [1, 2], "note": None})
    assert taken == [] and list(tmp_path.iterdir()) == []
    for key in ("", 5):  # h5py: "Can't synchronously determine if attribute exists by name (no attribute name)"
        with pytest.raises(ValueError, match=f"attrs names must be non-empty texts, got {key!r}"):
            write_demos(tmp_path / "d.hdf5", demos(), "push", attrs={key: 1})
    assert taken == [] and list(tmp_path.iterdir()) == []
    path = write_demos(tmp_path / "d.hdf5", demos(), "push", attrs={"episode_seeds": [1, 2], "note": "ü"})
    assert list(demo_file_info(path)["attrs"]["episode_seeds"]) == [1, 2]
    assert demo_file_info(path)["attrs"]["note"] == "ü"


def test_write_demos_refuses_one_demo_for_the_list_and_a_folder_for_the_file(tmp_path, np_rng):
    """One mapping demo was iterated as its keys ("demo 0: expected a Demo or a mapping ..., got str"); a folder
    was found only at the rename, after every demo had been written."""
    demo = random_demo(np_rng, 2, 4, 4, 3, instruction="")
    with pytest.raises(TypeError, match=r"demos must be an iterable of demos, got one dict; pass \[demo\]"):
        write_demos(tmp_path / "d.hdf5", {"frames": demo.frames, "actions": demo.actions}, "push")
    with pytest.raises(TypeError, match="got one Demo"):
        write_demos(tmp_path / "d.hdf5", demo, "push")
    (tmp_path / "folder.hdf5").mkdir()

    def demos():
        raise AssertionError("a demo was read")
        yield

    with pytest.raises(IsADirectoryError, match="folder.hdf5 is a folder; give write_demos a file path"):
        write_demos(tmp_path / "folder.hdf5", demos(), "push")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.hdf5"]


def test_write_demos_refuses_a_success_flag_given_as_text(tmp_path, np_rng):
    """bool("False") is True: a failed demo flagged as text was written as a success."""
    demo = random_demo(np_rng, 2, 4, 4, 3, instruction="")
    with pytest.raises(ValueError, match="demo 1: success must be True or False, got the text 'False'"):
        write_demos(tmp_path / "d.hdf5", [demo, {"frames": demo.frames, "actions": demo.actions,
                                                 "success": "False"}], "push")
    path = write_demos(tmp_path / "d.hdf5", [demo, {"frames": demo.frames, "actions": demo.actions,
                                                    "success": np.bool_(False)}], "push")
    assert demo_file_info(path)["success"] == [True, False]


def test_iter_demos_refuses_names_given_as_one_text_and_reads_names_given_as_a_generator(tmp_path, np_rng):
    """names="demo_10" was tested with `in` on the text, so demo_1 was yielded too; names from a generator were
    used up by the first demo's test, so the demos named after it were not yielded."""
    demos = [random_demo(np_rng, 2, 4, 4, 3, instruction="") for _ in range(11)]
    path = write_demos(tmp_path / "d.hdf5", demos, "push")
    with pytest.raises(TypeError, match=r"names= is a collection of demo names, got the text 'demo_10'; "
                                        r"pass \{'demo_10'\}"):
        next(iter_demos(path, names="demo_10"))
    assert [d.name for d in iter_demos(path, names=(n for n in ["demo_1", "demo_10"]))] == ["demo_1", "demo_10"]


def test_a_text_attribute_written_as_a_list_of_one_is_read_as_its_text(tmp_path):
    """h5py stores attrs["instruction"] = ["open it"] as an array of one text, which was read as its printout
    "['open it']" and prompted every demo with it."""
    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["instruction"] = ["open the drawer"]
        for i in range(2):
            f[f"data/demo_{i}/obs/agentview_rgb"] = np.zeros((2, 4, 4, 3), np.uint8)
            f[f"data/demo_{i}/actions"] = np.zeros((2, 3), np.float32)
        f["data/demo_1"].attrs["instruction"] = [b"close the drawer"]
    assert [d.instruction for d in read_demos(path)] == ["open the drawer", "close the drawer"]
    assert demo_file_info(path)["instruction"] == "open the drawer"


def test_collect_keeps_the_episodes_a_task_file_holds_and_runs_only_the_missing_ones(tmp_path, monkeypatch):
    """A task file of the same settings holding too few episodes (one failed every attempt, or fewer were asked
    for) was collected again from its first episode: rerun with more --max-attempts, as the command advises, or
    more --episodes, every episode it held ran again. The file it ends with is the one a fresh run writes."""
    pytest.importorskip("metaworld")
    col = _scripted_episodes(monkeypatch, fails={(1, 0)})
    ran = []
    scripted = col.run_episode
    monkeypatch.setattr(col, "run_episode", lambda job: ran.append((job["episode"], job["attempt"])) or scripted(job))
    s = col.collect(["reach-v3"], 3, tmp_path / "a", image_size=8, seed=5, max_attempts=1, progress=False)
    assert s["incomplete"] == ["reach-v3"] and ran == [(0, 0), (1, 0), (2, 0)]
    ran.clear()
    s = col.collect(["reach-v3"], 3, tmp_path / "a", image_size=8, seed=5, max_attempts=2, progress=False)
    assert s["incomplete"] == [] and ran == [(1, 0), (1, 1)]
    assert (s["tasks"]["reach-v3"]["episodes"], s["tasks"]["reach-v3"]["reused"]) == (3, 2)
    ran.clear()
    s = col.collect(["reach-v3"], 4, tmp_path / "a", image_size=8, seed=5, max_attempts=2, progress=False)
    assert ran == [(3, 0)] and s["tasks"]["reach-v3"]["episodes"] == 4
    col.collect(["reach-v3"], 4, tmp_path / "b", image_size=8, seed=5, max_attempts=2, progress=False)
    kept, fresh = (tmp_path / "a" / "reach-v3.hdf5"), (tmp_path / "b" / "reach-v3.hdf5")
    for a, b in zip(read_demos(kept), read_demos(fresh), strict=True):
        assert np.array_equal(a.frames, b.frames) and np.array_equal(a.actions, b.actions)
        assert (a.instruction, a.success) == (b.instruction, b.success)
    assert list(demo_file_info(kept)["attrs"]["episode_seeds"]) == list(demo_file_info(fresh)["attrs"]["episode_seeds"])


@pytest.mark.parametrize("text, said", [("open\0it", "holds a NUL character"),
                                        ("open \udcff it", r"is not valid Unicode text \(surrogates not allowed\)")])
def test_write_demos_refuses_an_instruction_hdf5_cannot_store_naming_it(tmp_path, np_rng, text, said):
    """h5py refused such a text with its own message alone ("VLEN strings do not support embedded NULLs", a
    UnicodeEncodeError), after the first demo's frames were written."""
    demo = random_demo(np_rng, 2, 4, 4, 3, instruction="")
    with pytest.raises(ValueError, match=f"^instruction {re.escape(repr(text))} {said}"):
        write_demos(tmp_path / "d.hdf5", [demo], text)
    with pytest.raises(ValueError, match=f"^demo 1: instruction {re.escape(repr(text))} {said}"):
        write_demos(tmp_path / "d.hdf5", [demo, {"frames": demo.frames, "actions": demo.actions,
                                                 "instruction": text}], "push")
    assert list(tmp_path.iterdir()) == []


def test_a_file_open_for_writing_elsewhere_is_named_so_not_as_damaged(tmp_path, np_rng):
    """HDF5's file lock refused the read, and the message called the file damaged or cut short."""
    import subprocess
    import sys

    path = write_demos(tmp_path / "d.hdf5", [random_demo(np_rng, 2, 4, 4, 3, instruction="")], "push")
    holder = subprocess.Popen([sys.executable, "-c", f"import h5py, time; f = h5py.File({str(path)!r}, 'a'); "
                               f"print('open', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(OSError, match="d.hdf5: this HDF5 file is open for writing in another process") as e:
            read_demos(path)
        assert "damaged" not in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    assert len(read_demos(path)) == 1


def test_write_demos_names_the_demo_whose_steps_are_of_different_shapes(tmp_path):
    """Ragged lists failed in numpy ("setting an array element with a sequence") without naming the demo."""
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    ok = {"frames": frames, "actions": np.zeros((2, 2))}
    with pytest.raises(ValueError, match=r"^demo 1: actions are not one array \[T, D\] .*give every step's action "
                                         r"the same shape"):
        write_demos(tmp_path / "d.hdf5", [ok, {"frames": frames, "actions": [[1.0, 2.0], [1.0]]}], "push")
    with pytest.raises(ValueError, match=r"^demo 0: frames are not one array \[T, H, W, 3\] .*give every step's "
                                         r"frame the same shape"):
        write_demos(tmp_path / "d.hdf5", [{"frames": [frames[0], frames[0, :3]], "actions": np.zeros((2, 2))}],
                    "push")
    assert list(tmp_path.iterdir()) == []


def _damage_frames(path, demo: str) -> None:
    """Overwrite the first stored chunk of `demo`'s frames in the file at `path` with 0xff bytes."""
    with h5py.File(path) as f:
        chunk = f[f"data/{demo}/obs/agentview_rgb"].id.get_chunk_info(0)
    raw = bytearray(path.read_bytes())
    raw[chunk.byte_offset:chunk.byte_offset + chunk.size] = b"\xff" * chunk.size
    path.write_bytes(bytes(raw))


def test_collect_runs_again_the_episodes_of_a_task_file_whose_frames_are_damaged(tmp_path, monkeypatch):
    """Episodes kept from a task file are read when the file is written again: damaged frames would stop the run
    there, losing the episodes run since; they are read first, and a damaged file is collected again."""
    pytest.importorskip("metaworld")
    col = _scripted_episodes(monkeypatch)
    col.collect(["reach-v3"], 2, tmp_path, image_size=8, seed=5, progress=False)
    path = tmp_path / "reach-v3.hdf5"
    _damage_frames(path, "demo_1")
    with pytest.raises(ValueError, match="damaged"):
        read_demos(path)
    s = col.collect(["reach-v3"], 3, tmp_path, image_size=8, seed=5, progress=False)
    assert (s["tasks"]["reach-v3"]["episodes"], s["tasks"]["reach-v3"]["reused"], s["episodes_run"]) == (3, 0, 3)
    assert [int(d.frames[0, 0, 0, 0]) for d in read_demos(path)] == [
        col.episode_seed(5, "reach-v3", e, 0) % 251 for e in range(3)]


def test_collect_cutting_a_task_file_whose_frames_are_damaged_collects_it_again(tmp_path, monkeypatch):
    """A complete task file cut to fewer episodes is read; damaged frames stopped every rerun of the command there
    ("collect or copy the file again"), however often it was run."""
    pytest.importorskip("metaworld")
    col = _scripted_episodes(monkeypatch)
    col.collect(["reach-v3"], 3, tmp_path, image_size=8, seed=5, progress=False)
    path = tmp_path / "reach-v3.hdf5"
    _damage_frames(path, "demo_1")
    s = col.collect(["reach-v3"], 2, tmp_path, image_size=8, seed=5, progress=False)
    assert not s["tasks"]["reach-v3"]["skipped"] and s["episodes_run"] == 2
    assert [int(d.frames[0, 0, 0, 0]) for d in read_demos(path)] == [
        col.episode_seed(5, "reach-v3", e, 0) % 251 for e in range(2)]
    assert col.collect(["reach-v3"], 2, tmp_path, image_size=8, seed=5, progress=False)["tasks"]["reach-v3"]["skipped"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_collect_never_replaces_a_task_file_another_process_is_writing(tmp_path, monkeypatch, overwrite):
    """HDF5's file lock refused the read, and collect took the file for unreadable: it was replaced, under the
    process writing it, without --overwrite. Refused with --overwrite too, before any episode runs."""
    import subprocess
    import sys

    pytest.importorskip("metaworld")
    col = _scripted_episodes(monkeypatch)
    path = tmp_path / "reach-v3.hdf5"
    with h5py.File(path, "w") as f:
        f["images"] = np.zeros((2, 4, 4, 3), np.uint8)
    holder = subprocess.Popen([sys.executable, "-c", f"import h5py, time; f = h5py.File({str(path)!r}, 'a'); "
                               f"print('open', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        before = path.read_bytes()
        with pytest.raises(BlockingIOError, match=rf"^{re.escape(str(path))} is open for writing in another process, "
                                                  rf"and collect does not replace a file being written, even with "
                                                  rf"--overwrite; wait for that process"):
            col.collect(["reach-v3"], 1, tmp_path, image_size=8, seed=5, progress=False, overwrite=overwrite)
        assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["reach-v3.hdf5"]
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("n", [1, 3])
def test_collect_refuses_a_task_file_opened_for_writing_after_it_was_read(tmp_path, monkeypatch, n):
    """A task file of the same settings is read again to keep its episodes (n=3: it holds 2) or to cut it (n=1):
    a file another process opened for writing in between was taken for damaged and collected again."""
    pytest.importorskip("metaworld")
    col = _scripted_episodes(monkeypatch)
    col.collect(["reach-v3"], 2, tmp_path, image_size=8, seed=5, progress=False)
    path = tmp_path / "reach-v3.hdf5"
    before = path.read_bytes()

    def locked(p, **kw):
        raise BlockingIOError(f"{p}: this HDF5 file is open for writing in another process")
        yield

    monkeypatch.setattr(col, "iter_demos", locked)
    with pytest.raises(BlockingIOError, match=rf"^{re.escape(str(path))} is open for writing in another process, "
                                              rf"and collect does not replace a file being written"):
        col.collect(["reach-v3"], n, tmp_path, image_size=8, seed=5, progress=False)
    assert path.read_bytes() == before


def _libero_with(path, rng, where: str, key: str, value) -> None:
    write_libero_like(path, rng, n=1)
    with h5py.File(path, "a") as f:
        f[where].attrs[key] = value


@pytest.mark.parametrize("value, upright", [("False", False), (b"False", False), (np.bytes_(b"FALSE"), False),
                                            (" false", False), (np.False_, False), (0, False), ([False], False),
                                            ("True", True), (b"true", True), (np.True_, True), (1, True)])
def test_an_upright_attribute_written_as_text_reads_as_its_word(tmp_path, np_rng, value, upright):
    """`upright` stored as the text "False" by a hand-written file read as True (bool("False")): its LIBERO frames
    were taken for upright and not turned. Text reads as its word in any case; bools and 0 / 1 as before."""
    from worldvla.data.hdf5 import NO_TURN, ROTATED_180, frame_turn, looks_like_libero

    path = tmp_path / "libero.hdf5"
    _libero_with(path, np_rng, "data", "upright", value)
    assert frame_turn(path) == (NO_TURN if upright else ROTATED_180)
    assert looks_like_libero(path) is (not upright)


@pytest.mark.parametrize("value", ["yes", b"", np.bytes_(b"upright"), 2, 0.5])
def test_an_upright_attribute_neither_true_nor_false_is_refused_naming_it(tmp_path, np_rng, value):
    path = tmp_path / "libero.hdf5"
    _libero_with(path, np_rng, "data", "upright", value)
    shown = repr(value.decode() if isinstance(value, bytes) else value)
    with pytest.raises(DemoFormatError, match=rf"^{re.escape(str(path))}:data: attribute 'upright' is "
                                              rf"{re.escape(shown)}, neither true nor false; write it as a bool"):
        read_demos(path)


def test_a_success_attribute_written_as_text_reads_as_its_word(tmp_path, np_rng):
    """A demo's `success` stored as the text "False" read as a successful demo, as `upright` did; write_demos
    refuses such text, and the reader now reads it as its word, or refuses other text naming the demo."""
    path = tmp_path / "libero.hdf5"
    _libero_with(path, np_rng, "data/demo_0", "success", "False")
    assert [d.success for d in read_demos(path)] == [False] and demo_file_info(path)["success"] == [False]
    _libero_with(path, np_rng, "data/demo_0", "success", b"TRUE")
    assert [d.success for d in read_demos(path)] == [True]
    _libero_with(path, np_rng, "data/demo_0", "success", "done")
    with pytest.raises(DemoFormatError, match=rf"^{re.escape(str(path))}:data/demo_0: attribute 'success' is "
                                              rf"'done', neither true nor false"):
        demo_file_info(path)


def test_collect_refuses_a_folder_named_like_a_task_file_before_any_episode(tmp_path, monkeypatch):
    """A folder named `<task>.hdf5` was found only when the task's file was written, after its episodes had run."""
    pytest.importorskip("metaworld")
    col = _scripted_episodes(monkeypatch)
    (tmp_path / "reach-v3.hdf5").mkdir()
    ran = []
    monkeypatch.setattr(col, "run_episode", lambda job: ran.append(job) or pytest.fail("an episode ran"))
    for overwrite in (False, True):
        with pytest.raises(IsADirectoryError, match=r"reach-v3.hdf5 is a folder, where collect writes the task's "
                                                    r"file; move it away, or choose another --out"):
            col.collect(["reach-v3"], 2, tmp_path, image_size=8, seed=5, progress=False, overwrite=overwrite)
    assert not ran and (tmp_path / "reach-v3.hdf5").is_dir()


def test_frame_key_names_the_obs_key_a_camera_reads_at_the_first_demo(tmp_path, np_rng):
    """`frame_key` answers which obs key `iter_demos` reads for a camera spelling, settled at the file's first demo;
    None for a file without demos, and a camera the first demo lacks is refused as the reader refuses it."""
    from worldvla.data.hdf5 import frame_key

    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        for name in ("agentview_image", "robot0_eye_in_hand_image"):
            f[f"data/demo_0/obs/{name}"] = np_rng.integers(0, 256, size=(2, 6, 6, 3), dtype=np.uint8)
        f["data/demo_0/actions"] = np.zeros((2, 7), np.float32)
        f["data/demo_1/obs/agentview_image"] = np_rng.integers(0, 256, size=(2, 6, 6, 3), dtype=np.uint8)
        f["data/demo_1/actions"] = np.zeros((2, 7), np.float32)
    assert [frame_key(path, c) for c in (None, "agentview", "agentview_image", "robot0_eye_in_hand")] == \
        ["agentview_image", "agentview_image", "agentview_image", "robot0_eye_in_hand_image"]
    with pytest.raises(DemoFormatError, match=re.escape(f"{path}:data/demo_0: no frames for camera 'agentview_rgb'")):
        frame_key(path, "agentview_rgb")
    empty = tmp_path / "empty.hdf5"
    with h5py.File(empty, "w") as f:
        f.create_group("data")
    assert frame_key(empty) is None and frame_key(empty, "agentview") is None


def test_drop_noops_records_the_files_step_of_each_kept_step(tmp_path, np_rng):
    """`Demo.steps` names the file's step of each kept row, and `check_actions` given them names a step not finite
    as the file numbers it (it named its place among the steps kept)."""
    from worldvla.data.hdf5 import check_actions

    demo = random_demo(np_rng, 8, 4, 4, 4, instruction="push")
    demo.actions[:, 3] = 1.0
    demo.actions[[0, 1, 4], :3] = 0.0  # no-ops: steps 0, 1 and 4
    path = write_demos(tmp_path / "d.hdf5", [demo], "push")
    (kept,) = read_demos(path, drop_noops=True)
    assert kept.steps.tolist() == [2, 3, 5, 6, 7] and read_demos(path)[0].steps is None
    np.testing.assert_array_equal(kept.actions, demo.actions[kept.steps])
    kept.actions[2, 0] = np.nan
    with pytest.raises(DemoFormatError, match=re.escape("x: actions contain NaN or inf (first at step 5 of 8)")):
        check_actions(kept.actions, "x", kept.steps, 8)
    with pytest.raises(DemoFormatError, match=re.escape("x: actions contain NaN or inf (first at step 2 of 5)")):
        check_actions(kept.actions, "x")


def test_a_path_beginning_with_a_tilde_is_under_the_home_folder(tmp_path, np_rng, monkeypatch):
    """A path like "~/demos/d.hdf5" names a file in the user's home folder, as in a shell, for the writer and every
    reader: it was taken literally, so the writer made a folder named "~" in the working directory and the readers
    found no file there."""
    from pathlib import Path

    from worldvla.data import hdf5

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    (home / "demos").mkdir()
    left = home / "demos" / f".d.hdf5.tmp-{_dead_pid()}-0123456789ab"
    left.write_bytes(b"partial")
    assert hdf5.remove_stale_temps("~/demos/d.hdf5") == [left] and not left.exists()
    assert hdf5.temp_name("~/demos/d.hdf5").parent == home / "demos"
    demo = random_demo(np_rng, 3, 4, 6, 2, instruction="")
    target = home / "demos" / "d.hdf5"
    assert write_demos("~/demos/d.hdf5", [demo], "push") == target
    assert write_demos(Path("~/demos/d.hdf5"), [demo], "push") == target
    assert list(work.iterdir()) == [] and sorted(p.name for p in (home / "demos").iterdir()) == ["d.hdf5"]
    for given in ("~/demos/d.hdf5", Path("~/demos/d.hdf5")):
        (back,) = read_demos(given)
        np.testing.assert_array_equal(back.frames, demo.frames)
        assert [d.name for d in iter_demos(given)] == ["demo_0"]
        assert demo_file_info(given)["num_demos"] == 1
        assert [name for name, _ in iter_demo_actions(given)] == ["demo_0"]
        assert hdf5.reading_record(given)["instruction"] == "push"
        assert hdf5.looks_like_libero(given) is False and hdf5.frame_turn(given) == hdf5.NO_TURN
        assert hdf5.first_demo_shape(given) == ((4, 6), 2) and hdf5.frame_key(given) == "agentview_rgb"
        assert hdf5.rotation_note([given]) is None
        with hdf5.open_demo_file(given) as f:
            assert f.filename == str(target)
    # a file each reader refuses is named by its place in the home folder, not by "~"
    with h5py.File(home / "other.hdf5", "w") as f:
        f["images"] = np.zeros(3)
    readers = {**_every_reader(), "iter_demos": lambda p: next(iter_demos(p)),
               "first_demo_shape": hdf5.first_demo_shape, "frame_key": hdf5.frame_key}
    for read in readers.values():
        with pytest.raises(DemoFormatError, match=f"^{re.escape(str(home / 'other.hdf5'))}: no 'data' group"):
            read("~/other.hdf5")
    assert list(work.iterdir()) == []


def test_boolean_frames_and_frames_reaching_both_ends_of_minus_one_to_one_get_the_advice_that_keeps_them(tmp_path):
    """Boolean frames (a mask) lie in [0, 1] and are scaled by 255; float frames reaching exactly -1.0 and 1.0 lie
    in [-1, 1] and get that scaling, not np.clip, which turns them black."""
    actions = np.zeros((2, 4), np.float32)
    mask = np.zeros((2, 4, 4, 3), bool)
    mask[0, 0, 0] = True
    with pytest.raises(ValueError, match=re.escape("got dtype bool; they lie in [0, 1]: convert with "
                                                   "(x * 255).round().astype(np.uint8)")):
        write_demos(tmp_path / "d.hdf5", [{"frames": mask, "actions": actions}], "push")
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 4, 4, 3)).astype(np.float32)
    x[0, 0, 0] = [-1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match=re.escape("they lie in [-1, 1]: convert with ((x + 1) * 127.5).round()")):
        write_demos(tmp_path / "d.hdf5", [{"frames": x, "actions": actions}], "push")
    assert list(tmp_path.iterdir()) == []


def test_write_demos_takes_integer_and_boolean_actions_as_numbers(tmp_path, np_rng):
    """Actions of any numeric dtype, booleans (a gripper's open / closed) included, are stored as float32 values."""
    frames = np_rng.integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8)
    flags = np.array([[True, False], [False, True]])
    path = write_demos(tmp_path / "d.hdf5", [{"frames": frames, "actions": flags},
                                             {"frames": frames, "actions": np.array([[3, -2], [0, 7]], np.int16)}],
                       "push")
    a, b = read_demos(path)
    np.testing.assert_array_equal(a.actions, [[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_array_equal(b.actions, [[3.0, -2.0], [0.0, 7.0]])
    with h5py.File(path) as f:
        assert f["data/demo_0/actions"].dtype == np.float32


def test_write_demos_refuses_a_success_flag_given_as_bytes(tmp_path, np_rng):
    """bool(b"False") is True, as bool("False") is: bytes are refused as text is."""
    demo = random_demo(np_rng, 2, 4, 4, 3, instruction="")
    with pytest.raises(ValueError, match=re.escape("demo 0: success must be True or False, got the text b'False'")):
        write_demos(tmp_path / "d.hdf5", [{"frames": demo.frames, "actions": demo.actions, "success": b"False"}],
                    "push")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("compression", [None, "gzip", "lzf"])
def test_write_demos_writes_frames_in_chunks_of_sixteen_steps_with_the_compression_asked_for(tmp_path, np_rng,
                                                                                           compression):
    """Frames are stored in chunks of at most 16 steps (a reader of a few frames decompresses no more than their
    chunk), compressed as `compression` says: None stores them uncompressed. The actions are not compressed."""
    demos = [random_demo(np_rng, 40, 4, 6, 2, instruction=""), random_demo(np_rng, 3, 4, 6, 2, instruction="")]
    path = write_demos(tmp_path / "d.hdf5", demos, "push", compression=compression)
    with h5py.File(path) as f:
        for i, steps in enumerate((16, 3)):
            frames = f[f"data/demo_{i}/obs/agentview_rgb"]
            assert frames.chunks == (steps, 4, 6, 3) and frames.compression == compression
            assert f[f"data/demo_{i}/actions"].compression is None
    for back, demo in zip(read_demos(path), demos, strict=True):
        np.testing.assert_array_equal(back.frames, demo.frames)


def test_write_demos_records_its_camera_and_uint8_done_flags(tmp_path, np_rng):
    """`data.attrs["camera"]` names the camera the frames were written for (obs/<camera>_rgb), and `dones` are
    uint8 [T], as the LIBERO / robomimic layout has them."""
    path = write_demos(tmp_path / "d.hdf5", [random_demo(np_rng, 3, 4, 4, 2, instruction="")], "push",
                       camera="wrist")
    with h5py.File(path) as f:
        assert f["data"].attrs["camera"] == "wrist" and list(f["data/demo_0/obs"]) == ["wrist_rgb"]
        dones = f["data/demo_0/dones"]
        assert dones.dtype == np.uint8 and dones.shape == (3,) and dones[()].tolist() == [0, 0, 1]
    assert demo_file_info(path)["attrs"]["camera"] == "wrist"


def test_a_files_instruction_attribute_is_read_before_libero_problem_info(tmp_path, np_rng):
    """`data.attrs["instruction"]`, where one is written over LIBERO's problem_info, is the file's instruction."""
    from worldvla.data.hdf5 import FROM_ATTRIBUTE, reading_record

    path = tmp_path / "libero.hdf5"
    write_libero_like(path, np_rng, n=1, instruction="put the bowl on the plate")
    with h5py.File(path, "a") as f:
        f["data"].attrs["instruction"] = "put the bowl on the stove"
    assert read_demos(path)[0].instruction == "put the bowl on the stove"
    assert (demo_file_info(path)["instruction"], demo_file_info(path)["instruction_from"]) == (
        "put the bowl on the stove", FROM_ATTRIBUTE)
    assert reading_record(path)["instruction_from"] == FROM_ATTRIBUTE


def test_rotation_note_names_three_files_and_counts_the_rest(tmp_path):
    """Up to three files are named; from a fourth on the rest are counted. With rotated and mirrored files, the
    mirrored ones are "those of" the files after the rotated ones, and a note of mirrored files alone says "the
    frames of" them."""
    from worldvla.data.hdf5 import MIRRORED, ROTATED_180, rotation_note

    files = [tmp_path / f"{c}.hdf5" for c in "abcde"]
    three = rotation_note(files[:3], turns=[ROTATED_180] * 3)
    assert "3 demo file(s) (a.hdf5, b.hdf5, c.hdf5) are rotated" in three and "more" not in three
    five = rotation_note(files, turns=[ROTATED_180] * 5)
    assert "5 demo file(s) (a.hdf5, b.hdf5, c.hdf5 and 2 more) are rotated" in five
    both = rotation_note(files[:2], turns=[ROTATED_180, MIRRORED])
    assert "; those of 1 demo file(s) (b.hdf5) are mirrored left-right" in both
    assert rotation_note(files[1:2], turns=[MIRRORED]).startswith("note: the frames of 1 demo file(s) (b.hdf5) are "
                                                                  "mirrored left-right")


def test_a_demo_without_a_success_attribute_or_done_flags_is_successful(tmp_path):
    """A hand-written demo that records neither `success` nor `dones` is taken as successful, so that a store of
    successful demos keeps it."""
    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        f.create_group("data").attrs["instruction"] = "push"
        f["data/demo_0/obs/agentview_rgb"] = np.zeros((2, 4, 4, 3), np.uint8)
        f["data/demo_0/actions"] = np.ones((2, 3), np.float32)
    assert [d.success for d in read_demos(path)] == [True] and demo_file_info(path)["success"] == [True]
    assert [name for name, _ in iter_demo_actions(path, only_success=True)] == ["demo_0"]


@pytest.mark.parametrize("shape", [(3,), (3, 0)])
def test_every_reader_refuses_actions_that_are_not_rows_of_values_naming_the_demo(tmp_path, np_rng, shape):
    """One value per step ([T]) or rows of no value ([T, 0]) are refused by `iter_demo_actions` and `demo_file_info`
    as by `read_demos`, naming the demo: [T] failed with numpy's AxisError from the finiteness check, and [T, 0] was
    handed on (a demo `read_demos` refuses) or, under drop_noops, skipped without a word."""
    path = write_demos(tmp_path / "d.hdf5", [random_demo(np_rng, 3, 4, 4, 2, instruction="") for _ in range(2)],
                       "push")
    with h5py.File(path, "a") as f:
        del f["data/demo_1/actions"]
        f["data/demo_1/actions"] = np.zeros(shape, np.float32)
    message = re.escape(f"{path}:data/demo_1: actions must be [T, D] (one row per step, D >= 1), got shape {shape}")
    for read in (read_demos, iter_demo_actions, lambda p: iter_demo_actions(p, drop_noops=True), demo_file_info):
        with pytest.raises(DemoFormatError, match=message):
            result = read(path)
            list(result) if not isinstance(result, dict) else result


def test_first_demo_shape_refuses_frames_that_are_a_group_naming_them(tmp_path):
    from worldvla.data.hdf5 import first_demo_shape

    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        f.create_group("data/demo_0/obs/agentview_rgb")
        f["data/demo_0/actions"] = np.zeros((2, 3), np.float32)
    with pytest.raises(DemoFormatError, match=re.escape(f"{path}:data/demo_0/obs/agentview_rgb: a group (keys: []), "
                                                        f"not a dataset")):
        first_demo_shape(path)


def test_reading_record_given_an_instruction_lists_no_demo_instructions(tmp_path, np_rng):
    """`instruction=` prompts every demo, their own instructions included: the record of such a read lists none of
    theirs, and says the instruction given is used."""
    from worldvla.data.hdf5 import reading_record

    demos = [random_demo(np_rng, 2, 4, 4, 2, instruction=t) for t in ("open it", "close it")]
    path = write_demos(tmp_path / "d.hdf5", demos, "push")
    assert reading_record(path)["demo_instructions"] == {"demo_0": "open it", "demo_1": "close it"}
    record = reading_record(path, instruction="lift it")
    assert record == {"rotation": "none", "instruction": "lift it", "instruction_from": "--instruction",
                      "uses_file_instruction": True}
    assert [d.instruction for d in read_demos(path, instruction="lift it")] == ["lift it"] * 2


def test_demo_file_info_gives_the_files_attributes_as_python_values(tmp_path, np_rng):
    """Scalar attributes are Python's int / bool / str, not numpy scalars (which json.dumps refuses)."""
    path = write_demos(tmp_path / "d.hdf5", [random_demo(np_rng, 2, 4, 4, 2, instruction="")], "push",
                       attrs={"seed": 5, "noise": 0.25})
    attrs = demo_file_info(path)["attrs"]
    assert attrs["upright"] is True and type(attrs["num_demos"]) is int and type(attrs["seed"]) is int
    assert type(attrs["noise"]) is float
    assert json.loads(json.dumps(attrs)) == {"seed": 5, "noise": 0.25, "instruction": "push", "num_demos": 1,
                                             "total": 2, "camera": "agentview", "upright": True}


def test_without_a_camera_libero_rgb_frames_are_read_before_robomimic_image_frames(tmp_path, np_rng):
    """A demo holding agentview frames under both keys is read from `agentview_rgb`, LIBERO's."""
    rgb, image = (np_rng.integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8) for _ in range(2))
    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        f.create_group("data").attrs["instruction"] = "push"
        f["data/demo_0/obs/agentview_image"] = image
        f["data/demo_0/obs/agentview_rgb"] = rgb
        f["data/demo_0/actions"] = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(read_demos(path, rotate_180=False)[0].frames, rgb)


def test_iter_demos_refuses_names_given_as_bytes(tmp_path, np_rng):
    """names=b"demo_0" was taken as a collection of its byte values, and no demo was yielded."""
    path = write_demos(tmp_path / "d.hdf5", [random_demo(np_rng, 2, 4, 4, 2, instruction="")], "push")
    with pytest.raises(TypeError, match=re.escape("names= is a collection of demo names, got the text b'demo_0'")):
        next(iter_demos(path, names=b"demo_0"))


def test_a_damaged_demo_header_is_named_by_the_demo_with_h5pys_message_unquoted(tmp_path, np_rng):
    """A damaged object header of a demo's group (h5py's KeyError "Unable to synchronously open object (bad object
    header version number)") is refused naming the demo, with h5py's message as it reads, not KeyError's quoted
    form."""
    path = write_demos(tmp_path / "d.hdf5", [random_demo(np_rng, 3, 4, 4, 2, instruction="") for _ in range(2)],
                       "push")
    with h5py.File(path) as f:
        header = h5py.h5o.get_info(f["data/demo_1"].id).addr
    raw = bytearray(path.read_bytes())
    raw[header] = 0xFF  # the header's version number
    path.write_bytes(bytes(raw))
    for read in (demo_file_info, read_demos):
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:data/demo_1: cannot read the file's structure, "
                                             rf"it is damaged \(h5py: [A-Z][^']*\); collect or copy the file again"):
            read(path)


def test_collect_does_not_keep_a_failed_demo_of_a_task_file_as_an_episode(tmp_path, monkeypatch):
    """A task file of these settings that holds fewer episodes than asked for keeps its successful demos only: a
    demo marked failed (the file edited by hand, or written by another tool) is run again, not kept."""
    pytest.importorskip("metaworld")
    col = _scripted_episodes(monkeypatch)
    settings = col._settings(8, 5, "corner", 200, 0.0)
    demos = [{"frames": np.full((3, 8, 8, 3), 7, np.uint8), "actions": np.zeros((3, 4), np.float32), "success": ok}
             for ok in (True, False)]
    write_demos(tmp_path / "reach-v3.hdf5", demos, "reach", attrs={
        **settings, "task": "reach-v3", "episode_seeds": [col.episode_seed(5, "reach-v3", e, 0) for e in range(2)]})
    s = col.collect(["reach-v3"], 3, tmp_path, image_size=8, seed=5, progress=False)
    t = s["tasks"]["reach-v3"]
    assert (t["episodes"], t["reused"], s["episodes_run"]) == (3, 1, 2)
    info = demo_file_info(tmp_path / "reach-v3.hdf5")
    assert info["success"] == [True] * 3
    assert list(info["attrs"]["episode_seeds"]) == [col.episode_seed(5, "reach-v3", e, 0) for e in range(3)]


def test_collects_progress_bar_counts_settled_episodes_not_attempts(tmp_path, monkeypatch):
    """The bar's total is the episodes to run; a failed attempt that is retried moves it by none (the retry
    settles the episode), and the failures so far are shown beside it."""
    pytest.importorskip("metaworld")
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, total, **kw):
            self.total, self.n, self.postfix = total, 0, []
            bars.append(self)

        def update(self, n):
            self.n += n

        def set_postfix(self, **kw):
            self.postfix.append(kw)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    col = _scripted_episodes(monkeypatch, fails={(0, 0), (1, 0), (1, 1)})
    s = col.collect(["reach-v3"], 2, tmp_path, image_size=8, seed=5, max_attempts=2, progress=True)
    assert s["tasks"]["reach-v3"]["episodes"] == 1  # episode 1 failed both of its attempts
    (bar,) = bars
    assert (bar.total, bar.n) == (2, 2)
    assert bar.postfix[-1] == {"failed": 3}


def test_a_collection_worker_ends_when_its_parents_pid_belongs_to_another_user(monkeypatch):
    """A worker watches the collecting process's pid: where signalling it is refused (the pid was reused by
    another user's process), the collecting process is gone and the worker ends, at its first look."""
    from worldvla.data import collect as col

    looks = []

    class Exited(Exception):
        pass

    def kill(pid, sig):
        looks.append((pid, sig))
        if len(looks) > 3:
            raise RuntimeError("the worker kept watching")
        raise PermissionError(1, "Operation not permitted")

    def exit_(code):
        raise Exited(code)

    monkeypatch.setattr(col.os, "kill", kill)
    monkeypatch.setattr(col.os, "_exit", exit_)
    with pytest.raises(Exited) as exited:
        col._exit_with(4242, every_s=0)
    assert exited.value.args == (1,) and looks == [(4242, 0)]


def test_a_collection_worker_leaves_ctrl_c_to_the_collecting_process_and_watches_it(monkeypatch):
    """A worker ignores SIGINT (Ctrl-C reaches the terminal's whole process group; the collecting process stops
    the pool) and watches the collecting process's pid in a thread of its own."""
    import signal
    import time

    from worldvla.data import collect as col

    watched = []
    monkeypatch.setattr(col, "_exit_with", watched.append)
    before = signal.getsignal(signal.SIGINT)
    try:
        col._init_worker(4242)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    deadline = time.monotonic() + 5
    while not watched and time.monotonic() < deadline:
        time.sleep(0.01)
    assert watched == [4242]


def test_collect_that_keeps_no_episode_of_a_task_leaves_no_file_of_it(tmp_path, monkeypatch):
    """Where every attempt of every episode fails, the task has no file: neither an empty one nor the one an
    earlier run of other settings left (replaced with --overwrite), which would be read downstream."""
    pytest.importorskip("metaworld")
    col = _scripted_episodes(monkeypatch)
    col.collect(["reach-v3"], 1, tmp_path, image_size=8, seed=4, progress=False)
    col = _scripted_episodes(monkeypatch, fails={(0, 0)})
    s = col.collect(["reach-v3"], 1, tmp_path, image_size=8, seed=5, max_attempts=1, progress=False, overwrite=True)
    t = s["tasks"]["reach-v3"]
    assert (t["episodes"], t["path"], s["incomplete"]) == (0, None, ["reach-v3"])
    assert not any(tmp_path.iterdir())


def test_collect_in_this_process_closes_the_envs_it_kept(tmp_path, monkeypatch):
    """The envs kept for reuse while episodes run in this process (workers=1) are closed when the collection
    ends: their renderers and simulator memory are not held after it."""
    pytest.importorskip("metaworld")
    col = _scripted_episodes(monkeypatch)
    closed = []

    class Env:
        def close(self):
            closed.append(self)

    env = Env()
    monkeypatch.setitem(col._ENVS, ("reach-v3", 8, "corner", 200), env)
    col.collect(["reach-v3"], 1, tmp_path, image_size=8, seed=5, progress=False)
    assert closed == [env] and col._ENVS == {}


def test_collect_runs_again_a_task_file_whose_seeds_are_not_one_per_demo(tmp_path, monkeypatch):
    """A file of these settings that records another number of episode seeds than it holds demos cannot tell
    which demo is which episode: none of its demos is kept, every episode runs."""
    pytest.importorskip("metaworld")
    col = _scripted_episodes(monkeypatch)
    settings = col._settings(8, 5, "corner", 200, 0.0)
    demos = [{"frames": np.full((3, 8, 8, 3), 7, np.uint8), "actions": np.zeros((3, 4), np.float32), "success": True}]
    write_demos(tmp_path / "reach-v3.hdf5", demos, "reach", attrs={
        **settings, "task": "reach-v3", "episode_seeds": [col.episode_seed(5, "reach-v3", e, 0) for e in range(2)]})
    s = col.collect(["reach-v3"], 2, tmp_path, image_size=8, seed=5, progress=False)
    t = s["tasks"]["reach-v3"]
    assert (t["episodes"], t["reused"], s["episodes_run"]) == (2, 0, 2)
    assert demo_file_info(tmp_path / "reach-v3.hdf5")["num_demos"] == 2


@pytest.mark.parametrize("given, advice", [("8", "use 32 or 32"), ("31", "use 32 or 32"), ("48", "use 32 or 64"),
                                           ("100", "use 96 or 128")])
def test_collects_image_size_refusal_advises_the_nearest_sizes_pretokenize_takes(given, advice):
    """--image-size that is no multiple of 32 is refused naming the multiples on either side of it; below 32 the
    smaller is 32 itself, not 0."""
    import argparse

    from worldvla.data.collect import _image_size

    with pytest.raises(argparse.ArgumentTypeError, match=rf"must be a multiple of 32 .*got {given}; {advice}$"):
        _image_size(given)
    assert _image_size("96") == 96


def test_an_empty_dones_dataset_is_no_success(tmp_path, np_rng):
    """Without a `success` attribute, a demo whose `dones` holds no flag at all (an empty dataset) is not a success:
    it is skipped where only successful demos are read, not tokenized as one."""
    path = tmp_path / "libero.hdf5"
    write_libero_like(path, np_rng, n=2)
    with h5py.File(path, "a") as f:
        del f["data/demo_1/dones"]
        f["data/demo_1"].create_dataset("dones", data=np.zeros(0, np.uint8))
    assert demo_file_info(path)["success"] == [True, False]
    assert [d.success for d in read_demos(path)] == [True, False]
    assert [name for name, _ in iter_demo_actions(path, only_success=True)] == ["demo_0"]


def test_a_task_name_holding_demo_keeps_it_and_loses_only_the_trailing_demo(tmp_path, np_rng):
    """A regenerated LIBERO file's instruction is its name less the trailing `_demo` only: a task that names a demo
    cup keeps the word, and a name without the suffix is read whole."""
    path = tmp_path / "x.hdf5"
    write_libero_like(path, np_rng, n=1)
    with h5py.File(path, "a") as f:
        for k in list(f["data"].attrs):
            del f["data"].attrs[k]
    for name, want in (("pick_up_the_demo_cup_demo", "pick up the demo cup"),
                       ("KITCHEN_SCENE3_turn_on_the_demo_stove", "turn on the demo stove")):
        named = path.rename(tmp_path / f"{name}.hdf5")
        assert read_demos(named)[0].instruction == want
        assert demo_file_info(named)["instruction"] == want
        path = named.rename(path)


def test_the_rotation_note_names_three_files_and_counts_a_fourth():
    """The note names at most three files and counts the rest: of four rotated files the fourth is counted as one
    more, not left out; three are all named with nothing counted."""
    from worldvla.data.hdf5 import ROTATED_180, rotation_note

    files = [f"/d/{n}.hdf5" for n in "abcd"]
    note = rotation_note(files, turns=[ROTATED_180] * 4)
    assert "the frames of 4 demo file(s) (a.hdf5, b.hdf5, c.hdf5 and 1 more) are rotated by 180 degrees" in note
    note = rotation_note(files[:3], turns=[ROTATED_180] * 3)
    assert "the frames of 3 demo file(s) (a.hdf5, b.hdf5, c.hdf5) are rotated" in note and "more" not in note
