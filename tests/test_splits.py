import json

import pytest

from covnet.importers.covid19ctseg import patient_groups
from covnet.runtime.errors import CovnetError
from covnet.training.splits import (
    cases_for_fold,
    fold_names,
    load_or_create_splits,
    load_or_make_splits,
    make_splits,
    save_splits,
)

# The 20 labelled cases of COVID-19-CT-Seg (Zenodo 3757476), named as covnet's importer names them.
CORONACASES = [f"coronacases_{index:03d}" for index in range(1, 11)]
RADIOPAEDIA = ["radiopaedia_10_85902_1", "radiopaedia_10_85902_3", "radiopaedia_14_85914_0", "radiopaedia_27_86410_0",
               "radiopaedia_29_86490_1", "radiopaedia_29_86491_1", "radiopaedia_36_86526_0", "radiopaedia_40_86625_0",
               "radiopaedia_4_85506_1", "radiopaedia_7_85703_0"]
COVID_CASES = CORONACASES + RADIOPAEDIA
COVID_GROUPS = patient_groups(COVID_CASES)


def fold_of(splits, case):
    return next(fold for fold, split in enumerate(splits) if case in split["val"])


def test_covid_groups_are_the_ones_the_importer_derives():
    assert COVID_GROUPS["radiopaedia_10_85902_1"] == COVID_GROUPS["radiopaedia_10_85902_3"]
    assert COVID_GROUPS["radiopaedia_29_86490_1"] == COVID_GROUPS["radiopaedia_29_86491_1"]
    assert len(set(COVID_GROUPS.values())) == 18


@pytest.mark.parametrize("seed", [12345, 0, 7, 99])
def test_covid_folds_keep_patients_together_and_are_balanced(seed):
    splits = make_splits(COVID_CASES, COVID_GROUPS, num_folds=5, seed=seed)
    assert len(splits) == 5
    assert fold_of(splits, "radiopaedia_10_85902_1") == fold_of(splits, "radiopaedia_10_85902_3")
    assert fold_of(splits, "radiopaedia_29_86490_1") == fold_of(splits, "radiopaedia_29_86491_1")
    validated = [case for split in splits for case in split["val"]]
    assert sorted(validated) == sorted(COVID_CASES)            # every case validated exactly once
    assert [len(split["val"]) for split in splits] == [4] * 5  # 20 cases, 18 patients: still 4 per fold
    for split in splits:
        assert not set(split["train"]) & set(split["val"])
        assert sorted(split["train"] + split["val"]) == sorted(COVID_CASES)


def test_same_seed_same_folds_whatever_the_case_order_and_another_seed_differs():
    first = make_splits(COVID_CASES, COVID_GROUPS, seed=12345)
    assert make_splits(list(reversed(COVID_CASES)), COVID_GROUPS, seed=12345) == first
    assert make_splits(COVID_CASES, COVID_GROUPS, seed=12346) != first


def test_a_large_group_is_balanced_by_case_count():
    groups = {f"p{index}": "big" for index in range(6)}
    cases = list(groups) + [f"single_{index}" for index in range(9)]
    splits = make_splits(cases, groups, num_folds=3, seed=1)
    sizes = sorted(len(split["val"]) for split in splits)
    assert sizes == [4, 5, 6]   # the six-case patient alone, the nine singles dealt to the two other folds
    assert len({fold_of(splits, f"p{index}") for index in range(6)}) == 1


def test_too_few_patients_for_the_folds_is_an_error_saying_what_to_do():
    with pytest.raises(CovnetError, match="3 folds from 2 patient.*use --num-folds 2 \\(leave-one-out\\)"):
        make_splits(["a", "b", "c"], {"a": "x", "b": "x"}, num_folds=3)
    with pytest.raises(CovnetError, match="2 folds from 1 patient\\(s\\); train on all cases \\(fold 'all'\\)"):
        make_splits(["a", "b"], {"a": "x", "b": "x"}, num_folds=2)
    with pytest.raises(CovnetError, match="--num-folds 1: cross-validation needs at least 2 folds"):
        make_splits(COVID_CASES, COVID_GROUPS, num_folds=1)


def test_leave_one_out_validates_each_patient_alone():
    cases = ["a", "b", "c", "d"]
    splits = make_splits(cases, num_folds=4)
    assert sorted(case for split in splits for case in split["val"]) == cases
    for split in splits:
        assert len(split["val"]) == 1 and sorted(split["train"] + split["val"]) == cases
    assert fold_names(splits) == ["0", "1", "2", "3"]


def test_new_folds_are_written_only_when_saved_and_any_count_is_read_back(tmp_path):
    path = tmp_path / "splits.json"
    splits, is_new = load_or_make_splits(path, COVID_CASES, COVID_GROUPS, num_folds=4)
    assert is_new and len(splits) == 4 and not path.exists()
    save_splits(path, splits)
    assert load_or_make_splits(path, COVID_CASES, COVID_GROUPS) == (splits, False)       # the file's own count
    assert load_or_make_splits(path, COVID_CASES, COVID_GROUPS, num_folds=4) == (splits, False)
    with pytest.raises(CovnetError, match="holds 4 folds, not the 5 asked for \\(--num-folds\\); delete"):
        load_or_make_splits(path, COVID_CASES, COVID_GROUPS, num_folds=5)
    assert len(load_or_create_splits(tmp_path / "new.json", COVID_CASES, COVID_GROUPS)) == 5   # the default


def test_splits_are_written_once_and_read_back(tmp_path):
    path = tmp_path / "splits.json"
    written = load_or_create_splits(path, COVID_CASES, COVID_GROUPS)
    assert json.loads(path.read_text()) == written
    # a hand-edited (but consistent) file wins over what make_splits would produce now
    edited = [{"train": split["train"], "val": split["val"]} for split in written]
    edited[0], edited[1] = edited[1], edited[0]
    path.write_text(json.dumps(edited))
    assert load_or_create_splits(path, COVID_CASES, COVID_GROUPS) == edited
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_changed_case_set_names_the_changes_and_keeps_the_file(tmp_path):
    path = tmp_path / "splits.json"
    load_or_create_splits(path, COVID_CASES, COVID_GROUPS)
    before = path.read_text()
    changed = [case for case in COVID_CASES if case != "coronacases_004"] + ["coronacases_011"]
    with pytest.raises(CovnetError) as raised:
        load_or_create_splits(path, changed, COVID_GROUPS)
    message = str(raised.value)
    assert raised.value.path == str(path)
    assert "1 case(s) added" in message and "coronacases_011" in message
    assert "1 case(s) removed" in message and "coronacases_004" in message
    assert "delete" in message
    assert path.read_text() == before


def test_stored_splits_that_separate_a_patient_are_refused(tmp_path):
    path = tmp_path / "splits.json"
    splits = make_splits(COVID_CASES, {}, seed=3)   # made without groups: may separate the radiopaedia pairs
    a, b = "radiopaedia_10_85902_1", "radiopaedia_10_85902_3"
    if fold_of(splits, a) == fold_of(splits, b):    # force them apart: swap b with a case of another fold
        other = next(split for split in splits if a not in split["val"])
        mine = splits[fold_of(splits, a)]
        swap = other["val"][0]
        mine["val"] = sorted(c if c != b else swap for c in mine["val"])
        other["val"] = sorted(c if c != swap else b for c in other["val"])
        for split in splits:
            split["train"] = sorted(set(COVID_CASES) - set(split["val"]))
    path.write_text(json.dumps(splits))
    with pytest.raises(CovnetError, match="patient radiopaedia_10"):
        load_or_create_splits(path, COVID_CASES, COVID_GROUPS)


def test_other_fold_count_and_malformed_files_are_errors(tmp_path):
    path = tmp_path / "splits.json"
    load_or_create_splits(path, COVID_CASES, COVID_GROUPS, num_folds=5)
    with pytest.raises(CovnetError, match="holds 5 folds, not the 4"):
        load_or_create_splits(path, COVID_CASES, COVID_GROUPS, num_folds=4)
    path.write_text('{"train": []}')
    with pytest.raises(CovnetError, match="not a splits file"):
        load_or_create_splits(path, COVID_CASES, COVID_GROUPS)
    path.write_text("[{")
    with pytest.raises(CovnetError, match="not valid JSON"):
        load_or_create_splits(path, COVID_CASES, COVID_GROUPS)


def test_cases_for_fold():
    splits = make_splits(COVID_CASES, COVID_GROUPS)
    train, val = cases_for_fold(splits, 2)
    assert (train, val) == (splits[2]["train"], splits[2]["val"])
    assert cases_for_fold(splits, "2") == (train, val)
    train_all, val_all = cases_for_fold(splits, "all")
    assert train_all == sorted(COVID_CASES) and val_all == []
    for bad in (5, -1, "five", 1.5, "02", True):
        with pytest.raises(CovnetError, match="does not exist; choose 0 to 4 or 'all'"):
            cases_for_fold(splits, bad)
