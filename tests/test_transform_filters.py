"""Batch transform's DataProcessing behaves as SageMaker documents it: each example of AWS's "Associate Prediction
Results with Input Records" page and DataProcessing reference, reproduced, and what falls outside refused clearly."""

from __future__ import annotations

import re

import pytest

from servelet.transform.filters import DataProcessing, FilterError

JSON = "application/json"
JSONL = "application/jsonlines"
CSV = "text/csv"


def run(spec: dict | None, record: bytes, model_output: bytes, content_type: str = JSON) -> tuple[bytes, bytes]:
    """What the model is sent and what is written, for one record through a job created with `spec`."""
    processing = DataProcessing.parse(spec)
    return (processing.filter_input(record, content_type),
            processing.join_and_filter_output(record, model_output, content_type))


# --- AWS's examples ---------------------------------------------------------------------------------------------

def test_default_outputs_only_the_inferences_untouched():
    """Example: Output Only Inferences ({"InputFilter": "$", "JoinSource": "None", "OutputFilter": "$"})."""
    record, output = b'{"key": 1}', b'{"label": 1}'
    for spec in (None, {}, {"InputFilter": "$", "JoinSource": "None", "OutputFilter": "$"}):
        assert run(spec, record, output) == (record, output)


def test_defaults_pass_any_content_type_through_byte_for_byte():
    """Without DataProcessing a job on images or protobuf must not try to read its records."""
    assert run(None, b"\x89PNG\r\n", b"\x00\x01", "image/png") == (b"\x89PNG\r\n", b"\x00\x01")


@pytest.mark.parametrize("content_type", [JSON, JSONL, "application/jsonlines; charset=utf-8"])
def test_join_input_adds_the_output_under_sagemaker_output(content_type):
    """Example: Output Input Data and Inferences: {"key":1} with {"label":1} → SageMakerOutput added."""
    assert run({"JoinSource": "Input"}, b'{"key":1}', b'{"label":1}', content_type) == (
        b'{"key":1}', b'{"key":1,"SageMakerOutput":{"label":1}}')


@pytest.mark.parametrize("record", [b"[1,2,3]", b'"text"', b"42", b"null"])
def test_join_of_a_non_object_input_nests_it_under_sagemaker_input(record):
    """The note: the joined result must be an object, so other inputs go under SageMakerInput."""
    _, written = run({"JoinSource": "Input"}, record, b'{"label":1}')
    assert written == b'{"SageMakerInput":' + record + b',"SageMakerOutput":{"label":1}}'


def test_csv_join_appends_the_output_columns():
    """The example's CSV case: record [1,2,3] with label [1] → [1,2,3,1]."""
    assert run({"JoinSource": "Input"}, b"1,2,3", b"1\n", CSV) == (b"1,2,3", b"1,2,3,1")


def test_csv_id_column_excluded_from_the_input_and_kept_in_the_output():
    """Example: Output an ID Column with Results and Exclude the ID Column from the Input (CSV), five columns."""
    spec = {"InputFilter": "$[1:]", "JoinSource": "Input", "OutputFilter": "$"}
    assert run(spec, b"id-7,0.1,0.2,0.3,0.4", b"0.93", CSV) == (b"0.1,0.2,0.3,0.4", b"id-7,0.1,0.2,0.3,0.4,0.93")


def test_csv_output_filter_from_the_reference_keeps_the_id_and_the_prediction():
    """OutputFilter "$[0,5:]" (the DataProcessing reference's example) on that joined row: column 0 and 5 on."""
    spec = {"InputFilter": "$[1:]", "JoinSource": "Input", "OutputFilter": "$[0,5:]"}
    assert run(spec, b"id-7,0.1,0.2,0.3,0.4", b"0.93", CSV)[1] == b"id-7,0.93"
    spec["OutputFilter"] = "$[0,-1]"
    assert run(spec, b"id-7,0.1,0.2,0.3,0.4", b"0.93", CSV)[1] == b"id-7,0.93"


def test_json_id_attribute_excluded_from_the_input_and_kept_in_the_output():
    """Example: Output an ID Attribute with Results and Exclude the ID Attribute from the Input (JSON)."""
    spec = {"InputFilter": "$.features", "JoinSource": "Input", "OutputFilter": "$['id','SageMakerOutput']"}
    record = b'{"id": "a-1", "features": [0.5, 1.5], "note": "dropped"}'
    assert run(spec, record, b'{"label": 1}', JSONL) == (
        b"[0.5,1.5]", b'{"id":"a-1","SageMakerOutput":{"label":1}}')


def test_input_sagemaker_output_key_is_replaced_by_the_inference():
    """The page's warning: an input attribute named SageMakerOutput is overwritten."""
    assert run({"JoinSource": "Input"}, b'{"SageMakerOutput":"old","k":2}', b"[9]")[1] == (
        b'{"SageMakerOutput":[9],"k":2}')


@pytest.mark.parametrize("path", [
    "$", "$[1:]", "$.features", "$[0,5:]", "$['id','SageMakerOutput']",  # the reference's examples
    "$.id", "$.id.*", "$[1]", "$[1,3,5]", "$[-1]", "$[2:5]", "$[:5]", "$[2:]",  # the operator table's
    "$.field1.['child1','child2']",  # supported, says the note under the table
])
def test_every_documented_path_is_accepted_in_both_filters(path):
    DataProcessing.parse({"InputFilter": path, "OutputFilter": path})


# --- paths: nesting, slices, shapes -----------------------------------------------------------------------------

RECORD = b'{"id": 3, "a": {"b": [10, 20, 30, 40, 50]}, "items": [{"id": "x"}, {"id": "y"}], "n": {"p": 1, "q": 2}}'


@pytest.mark.parametrize(("path", "expected"), [
    ("$.a.b[0]", b"10"),
    ("$['a']['b'][-1]", b"50"),
    ("$.a.b[1:4]", b"[20,30,40]"),  # end excluded, as in JSONPath (Jayway) slices
    ("$.a.b[:2]", b"[10,20]"),
    ("$.a.b[3:]", b"[40,50]"),
    ("$.a.b[-2:]", b"[40,50]"),
    ("$.a.b[9:]", b"[]"),  # a slice past the end is empty, as in JSONPath
    ("$.a.b[4,0]", b"[50,10]"),  # in the order asked
    ("$.a.b[0,3:]", b"[10,40,50]"),
    ("$.items[*].id", b'["x","y"]'),
    ("$.items[0].id", b'"x"'),
    ("$.n.*", b"[1,2]"),
    ("$.n['q','p']", b'{"q":2,"p":1}'),
    ("$.a", b'{"b":[10,20,30,40,50]}'),
])
def test_nested_paths_and_slices(path, expected):
    assert DataProcessing.parse({"InputFilter": path}).filter_input(RECORD, JSON) == expected


def test_output_filter_applies_to_the_joined_record():
    spec = {"JoinSource": "Input", "OutputFilter": "$.SageMakerOutput.scores[0]"}
    assert run(spec, b'{"id":1}', b'{"scores":[0.7,0.3]}')[1] == b"0.7"


def test_output_filter_without_join_applies_to_the_bare_output():
    assert run({"OutputFilter": "$.label"}, b'{"id":1}', b'{"label": "cat", "p": 0.9}')[1] == b'"cat"'


def test_csv_quoted_columns_survive_filtering():
    spec = {"InputFilter": "$[1:]", "JoinSource": "Input", "OutputFilter": "$[0,-1]"}
    assert run(spec, b'"Doe, J",5,"say ""hi"""\r\n', b'"a,b"', CSV) == (b'5,"say ""hi"""', b'"Doe, J","a,b"')


# --- refusals at job creation -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "reason"), [
    ("$..id", "outside SageMaker's JSONPath subset"),
    ("$[?(@.id > 1)]", "not valid JSONPath"),
    ("$[1:4:2]", "slice steps"),
    ("$[0:2,246:]", "only one range"),
    ("$['a','b'].c", "must be the last step"),
    ("$.field1.['child1','child2.grandchild']", "cannot go deeper"),
    ("id", "must start at the record's root"),
    ("", "must start at the record's root"),
    ("$.a.$", "outside SageMaker's JSONPath subset"),
    ("$.a | $.b", "outside SageMaker's JSONPath subset"),
    ("$[", "not valid JSONPath"),
    ("$." + "x" * 62, "at most 63"),
])
@pytest.mark.parametrize("field", ["InputFilter", "OutputFilter"])
def test_paths_outside_the_subset_are_refused_naming_the_field(field, path, reason):
    with pytest.raises(FilterError, match=field) as refused:
        DataProcessing.parse({field: path})
    assert reason in str(refused.value)


@pytest.mark.parametrize(("spec", "message"), [
    ({"JoinSource": "input"}, "JoinSource must be one of None, Input"),
    ({"JoinSource": "Output"}, "JoinSource must be one of None, Input"),
    ({"InputFilter": 5}, "InputFilter must be a JSONPath string"),
    ({"Filter": "$"}, "DataProcessing has no field Filter"),
])
def test_bad_fields_are_refused_by_name(spec, message):
    with pytest.raises(FilterError, match=message):
        DataProcessing.parse(spec)


def test_key_paths_on_csv_are_refused_before_the_first_record():
    processing = DataProcessing.parse({"InputFilter": "$.features"})
    with pytest.raises(FilterError, match=r"InputFilter '\$.features' names keys, but CSV rows are arrays"):
        processing.check_content_type(CSV)
    with pytest.raises(FilterError, match="CSV rows are arrays"):
        processing.filter_input(b"1,2", CSV)


def test_filters_on_other_formats_are_refused():
    with pytest.raises(FilterError, match="JSON, JSON Lines and CSV records, not 'image/png'"):
        DataProcessing.parse({"JoinSource": "Input"}).check_content_type("image/png")


# --- per-record failures ----------------------------------------------------------------------------------------

def test_a_record_lacking_the_key_fails_with_the_path_and_an_excerpt():
    processing = DataProcessing.parse({"InputFilter": "$.features"})
    with pytest.raises(FilterError) as failed:
        processing.filter_input(b'{"id": 7, "feature": [1, 2]}', JSONL)
    assert str(failed.value) == "filter '$.features': no key 'features' in record '{\"id\": 7, \"feature\": [1, 2]}'"


def test_a_multi_key_filter_fails_for_any_missing_key_rather_than_dropping_it():
    processing = DataProcessing.parse({"JoinSource": "Input", "OutputFilter": "$['id','SageMakerOutput']"})
    with pytest.raises(FilterError, match=r"no key 'id' in record '\{\"x\":1,\"SageMakerOutput\":2\}'"):
        processing.join_and_filter_output(b'{"x":1}', b"2", JSON)


def test_the_excerpt_of_a_long_record_is_cut_short():
    record = b'{"text": "' + b"y" * 5000 + b'"}'
    with pytest.raises(FilterError) as failed:
        DataProcessing.parse({"InputFilter": "$.features"}).filter_input(record, JSON)
    assert len(str(failed.value)) < 160 and str(failed.value).endswith("…'")


@pytest.mark.parametrize(("path", "record", "reason"), [
    ("$[5]", b"[1,2]", "index 5 is past the end of an array of 2"),
    ("$[0,-3]", b"[1,2]", "index -3 is past the end"),
    ("$[0]", b'{"a":1}', "an index applied to a JSON object"),
    ("$.a", b"[1]", "key 'a' applied to a array"),
    ("$.a.b", b'{"a":3}', "key 'b' applied to a int value"),
    ("$.a.*", b'{"a":null}', "`*` applied to a null"),
])
def test_records_the_filter_cannot_apply_to(path, record, reason):
    with pytest.raises(FilterError, match=re.escape(f"filter '{path}'")) as failed:
        DataProcessing.parse({"InputFilter": path}).filter_input(record, JSON)
    assert reason in str(failed.value)


def test_csv_index_past_the_row_fails_the_record():
    with pytest.raises(FilterError, match="index 3 is past the end of an array of 2 in record '1,2'"):
        DataProcessing.parse({"InputFilter": "$[3]"}).filter_input(b"1,2", CSV)


@pytest.mark.parametrize(("record", "output", "what"), [
    (b'{"k": 1', b"1", "input record is not one JSON value"),
    (b'{"k": 1}', b"positive", "model output is not one JSON value"),
])
def test_records_that_are_not_json_fail(record, output, what):
    with pytest.raises(FilterError, match=what):
        run({"JoinSource": "Input"}, record, output)


def test_csv_records_with_embedded_newlines_fail():
    with pytest.raises(FilterError, match="more than one CSV row"):
        DataProcessing.parse({"InputFilter": "$[0]"}).filter_input(b"1,2\n3,4", CSV)


def test_output_is_compact_json():
    processing = DataProcessing.parse({"InputFilter": "$.x"})
    record = '{ "x" : { "a" : [ 1 , 2 ] , "é" : "ü" } }'.encode()
    assert processing.filter_input(record, JSON) == '{"a":[1,2],"é":"ü"}'.encode()
