"""TeacherSpec: fingerprint stability and coverage, strict loading, mismatch errors that name the field."""

from __future__ import annotations

import dataclasses

import pytest

from storage import DimensionMismatchError, FingerprintMismatchError, TeacherSpec
from tests.storage.rows import make_spec

CHANGED = {
    "weights_id": "files:ffff0000",
    "pooling": "lasttoken",
    "normalize": False,
    "max_seq_length": 65,
    "dim": 17,
    "query_prompt": "Instruct: find\nQuery: ",
    "passage_prompt": "passage: ",
    "padding_side": "left",
    "dtype": "bfloat16",
}


def test_fingerprint_is_stable_hex() -> None:
    a, b = make_spec(), make_spec()
    assert a.fingerprint == b.fingerprint
    assert len(a.fingerprint) == 32 and int(a.fingerprint, 16) >= 0
    assert TeacherSpec.from_dict(a.to_dict()).fingerprint == a.fingerprint
    # pinned: the fingerprint is stored in every store; changing its recipe orphans them all
    assert a.fingerprint == "0c5f938268c7dd6f71b43bca824b874e"


def test_fingerprint_ignores_model_name() -> None:
    assert make_spec(model="/some/other/path").fingerprint == make_spec().fingerprint
    make_spec().check_matches(make_spec(model="renamed"), "s")  # no error


def test_changed_fields_cover_every_vector_changing_field() -> None:
    names = {f.name for f in dataclasses.fields(TeacherSpec)}
    assert set(CHANGED) == names - {"model"}


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_every_other_field_changes_the_fingerprint(name: str) -> None:
    assert make_spec(**{name: CHANGED[name]}).fingerprint != make_spec().fingerprint


def test_from_dict_rejects_unknown_fields() -> None:
    data = make_spec().to_dict() | {"rope_scaling": 2.0}
    with pytest.raises(ValueError, match=r"no field\(s\) \['rope_scaling'\].*newer ddx"):
        TeacherSpec.from_dict(data)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"pooling": "bogus"}, "pooling must be one of"),
        ({"padding_side": "up"}, "padding_side must be 'left' or 'right'"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"dim": 0}, "must be positive"),
        ({"weights_id": ""}, "weights_id must identify"),
    ],
)
def test_invalid_specs_are_rejected(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_spec(**overrides)


@pytest.mark.parametrize("name", sorted(set(CHANGED) - {"dim"}))
def test_check_matches_names_the_differing_field(name: str) -> None:
    stored, requested = make_spec(), make_spec(**{name: CHANGED[name]})
    with pytest.raises(FingerprintMismatchError, match=rf"Store 'runs/s' was made by another teacher spec \({name}: "):
        stored.check_matches(requested, "runs/s")


def test_check_matches_reports_dimension_first() -> None:
    with pytest.raises(DimensionMismatchError, match=r"holds 16-d vectors .* gives 32-d vectors"):
        make_spec(dim=16).check_matches(make_spec(dim=32, pooling="cls"), "runs/s")
    assert issubclass(DimensionMismatchError, ValueError)


def test_check_matches_lists_all_differences() -> None:
    with pytest.raises(FingerprintMismatchError, match=r"pooling: store has 'mean', requested 'cls'; normalize: "):
        make_spec().check_matches(make_spec(pooling="cls", normalize=False), "s")
