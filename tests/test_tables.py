from dkm_param.tables import format_size, render_table


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


def test_sizes_read_in_binary_units():
    assert [format_size(n) for n in (512, 1536, 3 * 2**20, 5 * 2**30)] == ["512 B", "1.50 KiB", "3.00 MiB", "5.00 GiB"]


def test_printable_escapes_what_a_terminal_would_act_on():
    from dkm_param.tables import printable

    assert printable("layer.0 é ü") == "layer.0 é ü"
    assert printable("a\x1b[2Jb\nc\u202ed\x07") == "a\\x1b[2Jb\\nc\\u202ed\\x07"
