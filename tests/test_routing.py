"""Routing rules: which stable studies are analysed and which series, the sweeper and the
analysis following them, and the admin page with its tester."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from node import phantom
from node.analysis.bundle import ModelBundle
from node.records import routing
from node.records.db import (
    Analysis,
    AuditEvent,
    RoutingRule,
    Series,
    SlicePrediction,
    Study,
    StudyStatus,
)
from node.records.routing import Conditions, Rule, SeriesFacts, StudyFacts
from node.settings import DEMO_MODEL_DIR
from node.workflow import jobs, sweeper
from tests.test_pipeline import ingest_files, stable
from tests.webui import USERNAMES, csrf_token

CHEST = SeriesFacts("1.2.3.1", "CT", "Tórax 5mm", "CHEST", 5.0, 60)
THIN = SeriesFacts("1.2.3.2", "CT", "Pulmón 1mm", "CHEST", 1.0, 300)
STUDY = StudyFacts(
    "TÓRAX simple", frozenset({"CT", "SR"}), frozenset({"CT_SCANNER"}), (CHEST, THIN)
)


def study_rule(action: str = "analyze", **conditions) -> Rule:
    return Rule("study", "r", action, Conditions(**conditions))


# ------------------------------------------------------------------ evaluation


@pytest.mark.parametrize(
    ("conditions", "matches"),
    [
        ({}, True),
        ({"modality": "CT"}, True),
        ({"modality": "mr, PT"}, False),
        ({"body_part": "chest"}, True),
        ({"body_part": "ABDOMEN"}, False),
        ({"study_description": "Tórax Simple"}, True),  # "TÓRAX simple" stored
        ({"study_description": "torax*"}, True),
        ({"study_description": "abdomen*"}, False),
        ({"study_description": "^t.rax\\s", "syntax": "regex"}, True),
        ({"study_description": "^abd", "syntax": "regex"}, False),
        ({"series_description": "*pulmon*"}, True),
        ({"series_description": "*mediastino*"}, False),
        ({"calling_ae": "CT_SCANNER"}, True),
        ({"calling_ae": "MR_*"}, False),
        ({"slice_thickness_min": 0.5, "slice_thickness_max": 1.25}, True),
        ({"slice_thickness_max": 0.5}, False),
        ({"series_size_min": 100}, True),
        ({"series_size_max": 10}, False),
        # series conditions hold for one series together: the thin one is not "Tórax"
        ({"series_description": "torax*", "slice_thickness_max": 2}, False),
        ({"series_description": "pulmon*", "slice_thickness_max": 2}, True),
    ],
)
def test_each_study_condition(conditions, matches):
    decision = routing.decide_study([study_rule(**conditions)], STUDY)
    assert decision.analyze is matches
    assert (decision.rule is not None) is matches


def test_descriptions_are_folded_as_the_pull_folds_them():
    from node.dicom.pull import fold

    assert fold is routing.fold  # one folding function, the pull's
    for pattern in ("TÓRAX simple", "torax SIMPLE", "Tórax  Simple"):
        rule = Rule("study", "chest", "analyze", Conditions(study_description=pattern))
        assert routing.decide_study([rule], StudyFacts("Tórax Simple")).analyze


def test_the_first_matching_rule_decides_and_no_match_is_ignored_with_the_rules_named():
    ignore_mr = Rule("study", "No MR", "ignore", Conditions(modality="MR"))
    chest = Rule("study", "Chest CT", "analyze", Conditions(study_description="*torax*"))
    ignore_all = Rule("study", "Nothing else", "ignore")
    mr = StudyFacts("Tórax", frozenset({"MR"}))
    assert routing.decide_study([ignore_mr, chest], mr).rule.name == "No MR"
    assert not routing.decide_study([ignore_mr, chest], mr).analyze
    assert routing.decide_study([chest, ignore_mr], mr).analyze
    decision = routing.decide_study([chest, ignore_all], StudyFacts("Abdomen"))
    assert (decision.analyze, decision.reason) == (
        False,
        "routing rule 'Nothing else' ignores it",
    )
    decision = routing.decide_study([ignore_mr, chest], StudyFacts("Abdomen", frozenset({"CT"})))
    assert decision.rule is None and not decision.analyze
    assert decision.reason == "no routing rule matched (study rules: 'No MR', 'Chest CT')"


def test_series_rules_pick_by_description_then_thinnest_then_largest():
    lung = Rule("series", "Lung kernel", "largest", Conditions(series_description="*PULMON*"))
    thinnest = Rule("series", "Thinnest", "thinnest")
    largest = Rule("series", "Largest", "largest")
    candidates = [CHEST, THIN]
    assert routing.choose_series([lung, largest], candidates).index == 1
    assert routing.choose_series([lung, largest], [CHEST]).rule.name == "Largest"
    assert routing.choose_series([thinnest], candidates).index == 1
    equal = SeriesFacts("1.2.3.3", "CT", "copy", None, 5.0, 60)
    assert routing.choose_series([largest], [CHEST, equal]).index == 0  # first of equals
    smaller = Rule("series", "Smallest", "smallest", Conditions(series_size_max=100))
    assert routing.choose_series([smaller], candidates).index == 0
    none = routing.choose_series([lung], [CHEST])
    assert none.index is None and "no series rule matched" in none.reason


@pytest.mark.parametrize(
    ("kind", "action", "conditions", "message"),
    [
        ("study", "analyse it", {}, "action must be one of analyze, ignore"),
        ("series", "analyze", {}, "action must be one of largest, thinnest, smallest"),
        ("study", "analyze", {"syntax": "regex", "study_description": "(["}, "not a regular"),
        ("study", "analyze", {"series_size_min": 5, "series_size_max": 2}, "is above"),
        ("study", "analyze", {"slice_thickness_min": -1}, "must not be negative"),
        ("series", "largest", {"calling_ae": "X"}, "calling ae is about the study"),
        ("study", "analyze", {"syntax": "sql"}, "glob or regex"),
    ],
)
def test_bad_rules_are_refused_naming_the_fault(kind, action, conditions, message):
    with pytest.raises(ValueError, match=message):
        Rule(kind, "bad", action, Conditions.from_dict(conditions))


# ------------------------------------------------------------------ the node


@pytest.fixture(scope="module")
def two_series(tmp_path_factory) -> list[Path]:
    """One study, two CT series: a 12-slice "Torax 5mm" and a smaller 8-slice "Pulmón"."""
    folder = tmp_path_factory.mktemp("two-series")
    big = phantom.PhantomSpec(slices=12, seed=41, study_instance_uid="2.25.4141")
    small = phantom.PhantomSpec(
        slices=8, seed=42, study_instance_uid="2.25.4141", series_description="Pulmón fino"
    )
    return phantom.write_series(big, folder / "big") + phantom.write_series(small, folder / "small")


def set_rules(node, kind: str, rules: list[Rule]) -> None:
    with node.session_factory() as session, session.begin():
        routing.save_rules(session, kind, rules, "test")


def test_defaults_are_seeded_and_the_series_rows_keep_body_part_and_thickness(node, two_series):
    with node.session_factory() as session:
        assert routing.load_rules(session, "study") == list(routing.DEFAULT_STUDY_RULES)
        assert routing.load_rules(session, "series") == list(routing.DEFAULT_SERIES_RULES)
    ingest_files(node, two_series)
    with node.session_factory() as session:
        rows = session.scalars(select(Series).order_by(Series.id)).all()
    assert [(r.body_part_examined, r.slice_thickness) for r in rows] == [
        ("CHEST", pytest.approx(300 / 12, abs=1)),
        ("CHEST", pytest.approx(300 / 8, abs=1.5)),
    ]


def test_the_sweeper_ignores_stable_studies_no_rule_sends_with_the_reason(
    node, two_series, chest_series
):
    set_rules(
        node,
        "study",
        [Rule("study", "Lung series", "analyze", Conditions(series_description="pulmon*"))],
    )
    lung_study = ingest_files(node, two_series)
    for path in chest_series[1][:3]:  # "Torax 5mm" only
        node.ingestor.ingest_part10(path.read_bytes(), "TESTSCU")
    with node.session_factory() as session:
        other = session.scalar(select(Study.id).where(Study.id != lung_study))
    for study_id in (lung_study, other):
        stable(node, study_id, queued=False)
    work = sweeper.due_work(node)
    assert work.analyses == [lung_study]
    with node.session_factory() as session:
        ignored = session.get(Study, other)
        assert session.get(Study, lung_study).status == StudyStatus.QUEUED
    assert ignored.status == StudyStatus.IGNORED
    assert ignored.status_reason == "no routing rule matched (study rules: 'Lung series')"
    assert sweeper.due_work(node).analyses == []  # ignored stays ignored


def test_with_the_default_rules_every_stable_study_is_queued(node, chest_series):
    study_id = ingest_files(node, chest_series[1][:3])
    stable(node, study_id, queued=False)
    assert sweeper.due_work(node).analyses == [study_id]


def test_the_analysis_evaluates_the_series_the_rules_choose(make_node, two_series):
    node = make_node()
    set_rules(
        node,
        "series",
        [
            Rule("series", "Fine lung", "largest", Conditions(series_description="*pulmon*")),
            *routing.DEFAULT_SERIES_RULES,
        ],
    )
    study_id = ingest_files(node, two_series)
    stable(node, study_id)
    jobs.run_analysis(node, ModelBundle.load(DEMO_MODEL_DIR), study_id)
    with node.session_factory() as session:
        analysis = session.scalars(select(Analysis)).one()
        evaluated = set(session.scalars(select(SlicePrediction.sop_instance_uid)))
        small = session.scalars(
            select(Series).where(Series.series_description == "Pulmón fino")
        ).one()
        small_uids = {i.sop_instance_uid for i in small.instances}
    assert analysis.status == "done", analysis.error
    assert evaluated and evaluated <= small_uids
    skipped = set(analysis.instances_skipped.values())
    assert any("series rule 'Fine lung' chose the largest" in reason for reason in skipped)


# ------------------------------------------------------------------ admin page


def rule_fields(kind: str, rows: list[dict]) -> dict:
    fields = {f"{kind}-count": str(len(rows))}
    for i, row in enumerate(rows):
        fields.update({f"{kind}-{i}-{key}": value for key, value in row.items()})
    return fields


def edited_form(page: str, study_rows: list[dict], series_rows: list[dict], **extra) -> dict:
    return {
        "csrf_token": csrf_token(page),
        **rule_fields("study", study_rows),
        **rule_fields("series", series_rows),
        **extra,
    }


LUNG_STUDY_RULES = [
    {"name": "MR stays", "action": "ignore", "modality": "MR", "position": "2"},
    {"name": "Chest CT", "action": "analyze", "study_description": "TÓRAX simple", "position": "1"},
    {"name": "Analyse every study", "action": "analyze", "position": "3", "delete": "1"},
]
LUNG_SERIES_RULES = [
    {"name": "Fine lung", "action": "largest", "series_description": "*PULMON*", "position": "1"},
    {"name": "Largest axial CT series", "action": "largest", "position": "2"},
]


def test_routing_page_is_for_admins_only(client, admin_client):
    assert client.get("/admin/routing").status_code == 403
    page = admin_client.get("/admin/routing")
    assert page.status_code == 200
    assert "Analyse every study" in page.text and "Largest axial CT series" in page.text
    form = edited_form(page.text, LUNG_STUDY_RULES, LUNG_SERIES_RULES)
    assert client.post("/admin/routing", data=form).status_code in (400, 403)


def test_admin_edits_reorders_deletes_and_the_edit_is_audited(admin_client, web_node):
    page = admin_client.get("/admin/routing").text
    saved = admin_client.post(
        "/admin/routing", data=edited_form(page, LUNG_STUDY_RULES, LUNG_SERIES_RULES)
    )
    assert saved.status_code == 302
    with web_node.session_factory() as session:
        study_rules = routing.load_rules(session, "study")
        series_rules = routing.load_rules(session, "series")
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "routing_rules")
        ).all()
    assert [(r.name, r.action) for r in study_rules] == [
        ("Chest CT", "analyze"),
        ("MR stays", "ignore"),
    ]
    assert study_rules[0].conditions.study_description == "TÓRAX simple"
    assert [r.name for r in series_rules] == ["Fine lung", "Largest axial CT series"]
    assert {e.detail["kind"] for e in events} == {"study", "series"}
    study_event = next(e for e in events if e.detail["kind"] == "study")
    assert study_event.detail["before"] == ["Analyse every study: analyze if always"]
    assert study_event.username == USERNAMES["admin"]
    listed = admin_client.get("/admin/routing").text
    assert listed.index("Chest CT") < listed.index("MR stays")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"name": "Bad", "action": "analyze", "study_description": "([", "syntax": "regex"},
            "not a regular expression",
        ),
        (
            {"name": "Bad", "action": "analyze", "series_size_min": "many"},
            "series size min must be a number",
        ),
        ({"name": "", "action": "analyze"}, "a rule needs a name"),
    ],
)
def test_bad_rules_are_refused_on_the_page_and_nothing_is_saved(
    admin_client, web_node, row, message
):
    page = admin_client.get("/admin/routing").text
    answer = admin_client.post("/admin/routing", data=edited_form(page, [row], []))
    assert answer.status_code == 400
    assert message in answer.text
    with web_node.session_factory() as session:
        assert routing.load_rules(session, "study") == list(routing.DEFAULT_STUDY_RULES)
        assert routing.load_rules(session, "series") == list(routing.DEFAULT_SERIES_RULES)


def test_the_tester_evaluates_the_edited_rules_without_saving(admin_client, web_node, two_series):
    study_id = ingest_files(web_node, two_series)
    page = admin_client.get("/admin/routing").text
    assert "2.25.4141" in page  # among the recent studies
    answer = admin_client.post(
        "/admin/routing/test",
        data=edited_form(page, LUNG_STUDY_RULES, LUNG_SERIES_RULES, study="2.25.4141"),
    )
    assert answer.status_code == 200
    assert "Study rule <strong>Chest CT</strong> matches: the study is analysed" in answer.text
    with web_node.session_factory() as session:
        small = session.scalars(
            select(Series).where(Series.series_description == "Pulmón fino")
        ).one()
        assert session.scalar(select(RoutingRule.name).where(RoutingRule.kind == "study")) == (
            "Analyse every study"  # nothing saved
        )
        tests = session.scalars(select(AuditEvent).where(AuditEvent.action == "routing_test")).all()
    assert f"Series <strong>{small.series_instance_uid}</strong>" in answer.text
    assert "series rule <strong>Fine lung</strong> chose the largest" in answer.text
    assert [e.study_id for e in tests] == [study_id]
    # the same study, picked from the recent list, on rules that ignore it
    ignoring = [{"name": "Only MR", "action": "analyze", "modality": "MR"}]
    answer = admin_client.post(
        "/admin/routing/test",
        data=edited_form(page, ignoring, LUNG_SERIES_RULES, recent=str(study_id)),
    )
    assert "<strong>No study rule matches</strong>: the study is ignored" in answer.text
    assert "If forced, series" in answer.text
    unknown = admin_client.post(
        "/admin/routing/test", data=edited_form(page, ignoring, [], study="1.2.3.999")
    )
    assert unknown.status_code == 404
