"""A short, derandomized budget of the fuzzer at every door (tests/fuzz.py); `make fuzz` runs 10,000
cases. Each door's property is what any input must get (one sentence or success, no crash,
no hang), so a failure here is an input nobody listed."""

import os
import signal

from tests import fuzz


def test_generated_configs_get_a_plan_or_one_sentence():
    fuzz.config_door(100, derandomize=True)()


def test_generated_config_files_get_a_plan_or_one_sentence():
    fuzz.yaml_door(60, derandomize=True)()


def test_generated_images_decode_or_are_unreadable_and_never_crash_the_process():
    child = fuzz.DecodeChild()
    try:
        fuzz.image_door(150, child, derandomize=True)()
    finally:
        child.close()
    assert fuzz.outcomes[("image", "decoded")] and fuzz.outcomes[("image", "unreadable")]


def test_generated_checkpoint_folders_load_or_are_refused_in_one_sentence():
    fuzz.checkpoint_door(60, derandomize=True)()


def test_the_image_door_reports_a_crashed_decoder_and_goes_on():
    """A decoder that takes its process down is an outcome the door reports (with the input),
    not the end of the fuzzer or of the suite."""
    child = fuzz.DecodeChild()
    try:
        os.kill(child._process.pid, signal.SIGSEGV)  # as libpng's abort ends the process
        child._process.join()
        assert child.decode(b"\x89PNG")[0] == "crash"
        assert child.decode(b"\x89PNG")[0] == "unreadable"  # a new child took over
    finally:
        child.close()


def test_checkpoints_with_mutated_contents_resume_load_or_evaluate_or_are_one_sentence():
    fuzz.contents_door(6, derandomize=True)()


def test_generated_image_folders_train_pack_or_are_one_sentence_and_touch_nothing_else():
    fuzz.folder_door(15, derandomize=True)()
    told = fuzz.sentences["folder"].most_common(5)
    assert fuzz.outcomes[("folder", "accepted")], told
    assert fuzz.outcomes[("folder", "one sentence")], told


def test_edited_shard_indexes_and_shards_train_or_are_one_sentence():
    fuzz.shards_door(8, derandomize=True)()


def test_generated_evaluation_and_report_command_lines_touch_only_their_output():
    fuzz.command_door(8, derandomize=True)()
