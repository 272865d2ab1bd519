import random

from orchestrator.voting import agrees, majority_vote


def same_number(a: str, b: str) -> bool:
    return float(a) == float(b)


def test_majority_uses_grader_equivalence_not_strings():
    vote = majority_vote(["5", "5.0", "7"], same_number, random.Random(0))
    assert vote.final == "5"
    assert vote.support == 2
    assert vote.consensus == 2 / 3
    assert not vote.tied


def test_unparseable_answers_do_not_vote_but_count_against_consensus():
    vote = majority_vote([None, None, "3"], same_number, random.Random(0))
    assert vote.final == "3"
    assert vote.voters == 1
    assert vote.consensus == 1 / 3


def test_no_readable_answer_means_no_majority():
    vote = majority_vote([None, None, None], same_number, random.Random(0))
    assert vote.final is None
    assert vote.support == 0


def test_ties_are_broken_by_the_seeded_rng_not_by_position():
    winners = {majority_vote(["1", "2", "3"], same_number, random.Random(seed)).final for seed in range(40)}
    assert winners == {"1", "2", "3"}
    again = [majority_vote(["1", "2"], same_number, random.Random(s)).final for s in range(10)]
    assert again == [majority_vote(["1", "2"], same_number, random.Random(s)).final for s in range(10)]
    assert majority_vote(["1", "2"], same_number, random.Random(0)).tied


def test_agrees_is_false_without_answer_or_majority():
    assert agrees("4", "4.00", same_number)
    assert not agrees(None, "4", same_number)
    assert not agrees("4", None, same_number)
    assert not agrees("5", "4", same_number)
