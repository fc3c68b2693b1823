from elora_fed.data.shakespeare import fetch_texts, load_roles, parse_play, play_files

PLAY = """THE TRAGEDY OF TESTING

by Nobody

PERSONS REPRESENTED.

Bernardo, an officer.
Hamlet, Prince of Denmark.
Lady Macbeth, a guest.

ACT I.

Scene I. A platform.

[Enter Bernardo and Hamlet.]

Ber.
Who's there?

Ham.
Nay, answer me: stand,
and unfold yourself.

[Exit Bernardo.]

I am alone.

Lady M.
Out, damned spot!

HAMLET. Words, words, words.

SCENE II. Elsewhere.

Ber.
Long live the king! [Aside.] He.
"""


def test_parse_resolves_abbreviations_and_drops_directions_and_headings():
    roles = {r.name: r for r in parse_play(PLAY, "testing")}
    assert set(roles) == {"BERNARDO", "HAMLET", "LADY MACBETH"}
    assert roles["BERNARDO"].speeches == ("Who's there?", "Long live the king!  He.")
    # the paragraph after a stage direction continues the current speech; inline names count
    assert roles["HAMLET"].speeches == (
        "Nay, answer me: stand,\nand unfold yourself.",
        "I am alone.",
        "Words, words, words.",
    )
    assert roles["LADY MACBETH"].client_id == "testing:LADY_MACBETH"
    assert all("ACT" not in r.text and "Scene" not in r.text and "[" not in r.text for r in roles.values())


def test_a_poem_has_no_roles():
    assert parse_play("SONNETS\n\nShall I compare thee to a summer's day?\nThou art more lovely.\n", "sonnets") == []


def test_real_plays_one_edition_sorted_unique_clients():
    texts = fetch_texts()  # already extracted by the set-up: returns at once
    files = play_files(texts)
    assert all(f.name.endswith("_gut.txt") for f in files)
    roles = load_roles(texts)
    ids = [r.client_id for r in roles]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert len(roles) > 1000
    assert {r.play for r in roles} >= {"hamlet", "macbeth", "lear", "tempest"}
    assert not {r.play for r in roles} & {"sonnets", "rape_of_lucrece", "lovers_complaint"}
    hamlet = {r.name: r for r in roles if r.play == "hamlet"}
    assert len(hamlet["HAMLET"].speeches) > 300
    assert "To be, or not to be" in hamlet["HAMLET"].text
    assert {"BERNARDO", "HORATIO", "POLONIUS", "OPHELIA"} <= set(hamlet)
    assert not {"HAM", "BER", "HOR", "POL", "OPH"} & set(hamlet)  # abbreviations resolved
    for role in roles:
        assert "[" not in role.text and "]" not in role.text
        assert not any(line.startswith(("ACT ", "SCENE ")) for line in role.text.splitlines())
