"""Task metrics against hand-computed cases: entity spans and scores (conlleval rules), SQuAD EM and F1."""

import pytest

from pipeline.tasks.question_answering import answer_f1, normalize_answer, squad_scores
from pipeline.tasks.token_classification import check_tag_names, entity_scores, entity_spans


@pytest.mark.parametrize(
    ("tags", "spans"),
    [
        (["B-PER", "I-PER", "O", "B-LOC"], {("PER", 0, 1), ("LOC", 3, 3)}),
        (["O", "I-PER", "I-PER"], {("PER", 1, 2)}),  # an I- after O begins an entity (conlleval)
        (["B-PER", "I-LOC"], {("PER", 0, 0), ("LOC", 1, 1)}),  # the type changes: two entities
        (["B-PER", "B-PER", "I-PER"], {("PER", 0, 0), ("PER", 1, 2)}),  # B- always begins one
        (["I-PER"], {("PER", 0, 0)}),  # an entity that runs to the end is closed there
        (["S-PER", "B-LOC", "I-LOC", "E-LOC", "O", "E-ORG"], {("PER", 0, 0), ("LOC", 1, 3), ("ORG", 5, 5)}),
        (["B-PER", "E-PER", "I-PER"], {("PER", 0, 1), ("PER", 2, 2)}),  # E- ends one; the I- after begins another
        (["O", "O"], set()),
    ],
)
def test_entity_spans_follow_the_conlleval_chunk_rules(tags, spans):
    assert entity_spans(tags) == spans


def test_entity_scores_count_an_entity_only_with_its_exact_span_and_type():
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    predicted = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    scores = entity_scores(gold, predicted)  # seqeval's README example: F1 0.50
    assert scores["entity_precision"] == scores["entity_recall"] == scores["entity_f1"] == 0.5
    assert scores["token_accuracy"] == pytest.approx(8 / 10)  # words 2 and 3 of the first sequence differ
    scores = entity_scores([["B-PER", "I-PER", "O", "B-LOC"]], [["B-LOC", "I-LOC", "O", "B-LOC"]])
    assert (scores["entity_precision"], scores["entity_recall"]) == (0.5, 0.5)  # PER found as LOC: a miss
    scores = entity_scores([["B-PER", "O"]], [["B-PER", "B-LOC"]])
    assert (scores["entity_precision"], scores["entity_recall"]) == (0.5, 1.0)
    assert scores["entity_f1"] == pytest.approx(2 / 3)
    assert entity_scores([["O"]], [["O"]])["entity_f1"] == 0.0  # no entity at all: nothing found
    with pytest.raises(ValueError, match="pair up word for word"):
        entity_scores([["O", "O"]], [["O"]])


def test_tag_names_must_be_bio_or_bioes():
    assert check_tag_names(["O", "B-person", "I-person", "E-person", "S-person"]) is None
    assert "['PER', 'X-loc', 'B-']" in check_tag_names(["O", "PER", "X-loc", "B-"])


def test_squad_normalization_exact_match_and_f1_as_the_official_script():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a theory") == "apple theory"  # articles only as whole words
    assert answer_f1("Denver Broncos", "the Broncos") == pytest.approx(2 / 3)  # precision 1/2, recall 1
    assert answer_f1("Broncos Broncos", "Broncos") == pytest.approx(2 / 3)  # words counted with multiplicity
    assert answer_f1("Carolina", "Denver") == 0.0
    answers = {"q1": ["Denver Broncos", "The Denver Broncos"], "q2": ["Santa Clara, California"], "q3": ["1"]}
    scores = squad_scores({"q1": "the denver broncos.", "q2": "Santa Clara"}, answers)  # q3 unanswered: 0
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx((1 + 0.8) / 3)  # q2: precision 1, recall 2/3
