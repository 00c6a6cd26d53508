"""Hand-made graphs whose plans and bounds are worked out by hand in the tests."""

from planner.graph import build


def chain():
    # x(100) -f-> a(200) -g-> b(300) -h-> y(100)
    return build("chain", [("x", 100, "input"), ("a", 200, "activation"), ("b", 300, "activation"),
                           ("y", 100, "output")],
                 [("f", ["x"], ["a"]), ("g", ["a"], ["b"]), ("h", ["b"], ["y"])])


def diamond():
    # x -f1-> a; a -f2-> b(200); a -f3-> c(300); (b, c) -f4-> y
    return build("diamond", [("x", 100, "input"), ("a", 100, "activation"), ("b", 200, "activation"),
                             ("c", 300, "activation"), ("y", 100, "output")],
                 [("f1", ["x"], ["a"]), ("f2", ["a"], ["b"]), ("f3", ["a"], ["c"]), ("f4", ["b", "c"], ["y"])])


def residual():
    # x -conv1-> a -relu(in place)-> b -conv2-> c; (c, x) -add(in place over c)-> y
    return build("residual", [("x", 100, "input"), ("a", 100, "activation"), ("b", 100, "activation"),
                              ("c", 100, "activation"), ("y", 100, "output")],
                 [("conv1", ["x"], ["a"], 1000.0), ("relu", ["a"], ["b"], 100.0, ["a"]),
                  ("conv2", ["b"], ["c"], 1000.0), ("add", ["c", "x"], ["y"], 100.0, ["c"])])
