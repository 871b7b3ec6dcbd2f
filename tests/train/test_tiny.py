"""The synthetic tasks: exact answers, a wrong answer that differs, two disjoint families."""
import pytest

from minorsft.train import tiny

# Each task's answer from its prompt, written independently of tiny.py.
ANSWERS = {
    "add": lambda x: str(sum(int(d) for d in x.split("+"))),
    "rev": lambda w: w[::-1],
    "up": str.upper,
    "low": str.lower,
    "rot": lambda w: "".join("abcdefghijklmnopqrstuvwxyza"["abcdefghijklmnopqrstuvwxyz".index(c) + 1] for c in w),
    "swap": lambda w: w[1] + w[0] + w[2:],
}


@pytest.mark.parametrize("task", sorted(tiny.TASKS))
def test_answers_are_exact_and_the_wrong_one_differs(task):
    for row in tiny.synthetic_rows(200, seed=3, tasks=(task,)):
        prompt = row["prompt"]
        assert prompt.endswith("=")
        arg = prompt[:-1] if task == "add" else prompt[:-1].split(" ", 1)[1]
        assert row["response"] == row["chosen"] == ANSWERS[task](arg), row
        assert row["rejected"] != row["chosen"], row


def test_the_demo_families_are_disjoint_tasks_with_three_letter_answers():
    a, b = tiny.TASK_FAMILIES["A"], tiny.TASK_FAMILIES["B"]
    assert not set(a) & set(b) and set(a) | set(b) <= set(tiny.TASKS)
    for row in tiny.synthetic_rows(60, seed=1, tasks=a + b):
        assert len(row["response"]) == 3
