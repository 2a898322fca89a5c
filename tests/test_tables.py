from dkm_param.tables import format_size, natural_key, plural, render_table


def test_columns_are_padded_to_their_widest_cell_and_numbers_align_right():
    text = render_table(("name", "n", "note"), [("a", "1", "x"), ("long name", "1,234", "")], right={1}, footer=["end"])
    assert text.splitlines() == [
        "name           n  note",
        "----------------------",
        "a              1  x",
        "long name  1,234",
        "end",
    ]


def test_a_rule_below_the_rows_when_asked():
    assert render_table(("a", "b"), [("1", "2")], rule_below=True).splitlines() == ["a  b", "----", "1  2", "----"]


def test_long_notes_go_under_the_table_once_each_wrapped_to_its_width():
    long = "a reason " * 12
    rows = [("layer.0", "short"), ("layer.1", long.strip()), ("layer.2", long.strip())]
    lines = render_table(("layer", "note"), rows, footer=["total: " + "word " * 30], notes=True, width=40).splitlines()
    assert lines[:5] == ["layer    note", "--------------", "layer.0  short", "layer.1  [1]", "layer.2  [1]"]
    told = lines[5:lines.index(next(line for line in lines if line.startswith("total")))]
    assert told[0].startswith("[1] a reason") and all(line.startswith("    ") for line in told[1:])
    assert " ".join(line.strip() for line in told) == "[1] " + long.strip()  # told whole, once
    assert max(map(len, lines)) <= 40 and sum(line.startswith("[") for line in lines) == 1


def test_plural_counts():
    assert [plural(n, "layer") for n in (0, 1, 2, 1500)] == ["0 layers", "1 layer", "2 layers", "1,500 layers"]


def test_sizes_read_in_binary_units():
    assert [format_size(n) for n in (512, 1536, 3 * 2**20, 5 * 2**30)] == ["512 B", "1.50 KiB", "3.00 MiB", "5.00 GiB"]


def test_printable_escapes_what_a_terminal_would_act_on():
    from dkm_param.tables import printable

    assert printable("layer.0 é ü") == "layer.0 é ü"
    assert printable("a\x1b[2Jb\nc\u202ed\x07") == "a\\x1b[2Jb\\nc\\u202ed\\x07"


def test_natural_key_orders_numbers_by_value_and_survives_hostile_names():
    names = ["layers.11.w", "layers.2.w", "layers.2", "b", "10", "9", "x007", "x7", "²", "1" + "0" * 5000]
    ordered = sorted(names, key=natural_key)
    assert ordered.index("layers.2.w") < ordered.index("layers.11.w")
    assert ordered.index("9") < ordered.index("10") < ordered.index("1" + "0" * 5000)
    assert ordered.index("layers.2") < ordered.index("layers.2.w")
    assert sorted(ordered, key=natural_key) == ordered  # a total order: stable under re-sorting
