"""The method files' pieces say what they need from common.py, so that a copy into another project is complete.

Read from the source (ast), independently of the docstrings: for each piece on the paper's path (every top-level
class and function above a method file's "---- training ----" line), the common.py names it reaches, directly, through
the method file's other pieces, or through common.py's own helpers and constants. Its docstring, and its line of the
"To copy" list that ends the module docstring, must name each of them; the list must also name the pieces it pulls in
from its own file. Then a copy is made the way a user makes it: the listed pieces and common names are copied into a
module of their own, with no common.py, and VADeR's and CLoVE's steps run from it.
"""
import ast
import os
import re
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def top_level(path):
    """name -> ast node of each top-level def, class and assigned constant; and the module's docstring."""
    tree = ast.parse(open(path).read())
    nodes = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            nodes[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    nodes[target.id] = node
    return nodes, ast.get_docstring(tree), tree


COMMON, _, _ = top_level(os.path.join(ROOT, "common.py"))


def used_names(node):
    """The free names a definition reads: its arguments and the names it assigns are its own."""
    own = {n.arg for n in ast.walk(node) if isinstance(n, ast.arg)}
    own |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - own


def common_attributes(node):
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "common"}


def needs(name, nodes):
    """(the method file's other pieces, the common.py names) that `name` reaches, transitively."""
    local, todo = set(), [name]
    while todo:
        for other in used_names(nodes[todo.pop()]) & set(nodes):
            if other not in local and other != name:
                local.add(other)
                todo.append(other)
    shared = set().union(*(common_attributes(nodes[n]) for n in {name} | local))
    todo = list(shared)
    while todo:
        for other in used_names(COMMON[todo.pop()]) & set(COMMON):
            if other not in shared:
                shared.add(other)
                todo.append(other)
    return local, shared


def paper_pieces(path):
    """The top-level classes and functions above the '# ---- training ----' line, the arguments' section aside."""
    nodes, doc, tree = top_level(path)
    end = next(i for i, line in enumerate(open(path), 1) if line.startswith("# ---- training ----"))
    pieces = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.lineno < end
              and n.name != "get_parser"]
    return nodes, doc, pieces


def copy_list(doc):
    """The module docstring's 'To copy' list: piece -> the set of names its line (and continuation lines) gives."""
    lines = doc.split("To copy", 1)[1].splitlines()[1:]
    entries, current = {}, None
    for line in lines:
        match = re.match(r"\s{4}(\w+)\s+->(.*)", line)
        if match:
            current = match.group(1)
            entries[current] = set(re.findall(r"\w+", match.group(2)))
        elif current and line.startswith(" " * 8):
            entries[current] |= set(re.findall(r"\w+", line))
        elif line.strip():
            break
    return entries


@pytest.mark.parametrize("method", ["vader", "clove"])
def test_every_piece_names_what_it_needs_from_common(method):
    nodes, _, pieces = paper_pieces(os.path.join(ROOT, f"{method}.py"))
    assert len(pieces) >= 10
    missing = {}
    for name in pieces:
        _, shared = needs(name, nodes)
        said = set(re.findall(r"\w+", ast.get_docstring(nodes[name]) or ""))
        if shared - said:
            missing[name] = sorted(shared - said)
    assert not missing, f"{method}.py: docstrings that do not name the common.py helpers they need: {missing}"


@pytest.mark.parametrize("method", ["vader", "clove"])
def test_the_copy_list_names_each_piece_and_all_it_pulls_in(method):
    nodes, doc, pieces = paper_pieces(os.path.join(ROOT, f"{method}.py"))
    entries = copy_list(doc)
    assert len(entries) >= 5
    for name, said in entries.items():
        assert name in pieces, f"{method}.py's 'To copy' lists {name}, which is not a piece on the paper's path"
        local, shared = needs(name, nodes)
        assert not (local | shared) - said, f"{method}.py's 'To copy' line for {name} misses {(local | shared) - said}"
    steps = {"vader": {"PairedViews", "VADeRNet", "PixelQueue", "vader_loss", "vader_step"},
             "clove": {"CLoVEViews", "CLoVENet", "make_teacher", "update_teacher", "clove_loss", "clove_step", "LARS"}}
    assert steps[method] <= set(entries)


def copied_module(method):
    """What a user copies: the 'To copy' pieces and what their lines name, from the method file and from common.py,
    as source text executed in a fresh module that has no `common` (common.X is rewritten to X). Returns the module
    and (lines from the method file, lines from common.py)."""
    path = os.path.join(ROOT, f"{method}.py")
    nodes, doc, _ = paper_pieces(path)
    entries = copy_list(doc)
    wanted = set(entries).union(*entries.values())
    method_source, common_source = open(path).read().splitlines(), open(os.path.join(ROOT, "common.py")).read()
    common_lines = common_source.splitlines()

    def block(lines, node):
        start = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
        return lines[start - 1:node.end_lineno]

    from_common = [block(common_lines, COMMON[n]) for n in sorted(wanted & set(COMMON), key=lambda n: COMMON[n].lineno)]
    from_method = [block(method_source, nodes[n]) for n in sorted(wanted & set(nodes), key=lambda n: nodes[n].lineno)]
    imports = [line for line in common_lines + method_source if re.match(r"(import|from) ", line)
               and "common" not in line and "tqdm" not in line]
    text = "\n".join(imports + sum(from_common, []) + [re.sub(r"\bcommon\.", "", line)
                                                       for line in sum(from_method, [])])
    module = types.ModuleType(f"copied_{method}")
    exec(compile(text, f"copied_{method}", "exec"), module.__dict__)
    return module, sum(map(len, from_method)), sum(map(len, from_common))


def test_a_copy_of_vaders_pieces_trains_without_common():
    from PIL import Image
    m, _, _ = copied_module("vader")
    torch.manual_seed(0)
    views = m.PairedViews(64, 8)
    image = Image.new("RGB", (96, 80), (120, 60, 30))
    items = [views(image) for _ in range(2)]
    view1, view2, matches, appearance = (torch.stack(x) for x in zip(*items))
    f = m.VADeRNet("resnet18", 16)
    g = m.VADeRNet("resnet18", 16).requires_grad_(False)
    queue = m.PixelQueue(64, 16)
    loss, keys, top1 = m.vader_step(f, g, queue, view1, view2, matches, appearance, bn_splits=2)
    loss.backward()
    queue.enqueue(keys.flatten(0, 1))
    assert torch.isfinite(loss) and keys.shape == (2, 8, 16) and 0 <= float(top1) <= 1


def test_a_copy_of_cloves_pieces_trains_without_common():
    from PIL import Image
    m, _, _ = copied_module("clove")
    torch.manual_seed(0)
    views = m.CLoVEViews(64, 1, 32)
    image = Image.new("RGB", (96, 80), (120, 60, 30))
    batch = [torch.stack(x) for x in zip(*[views(image) for _ in range(2)])]
    student = m.CLoVENet("resnet18", hidden=32, dim=16, heads=2)
    teacher = m.make_teacher(student)
    optimizer = m.LARS(m.LARS.exclude_bias_and_norm(student, 1e-5), lr=0.1, weight_decay=1e-5)
    loss, _ = m.clove_step(student, teacher, *batch)
    loss.backward()
    optimizer.step()
    m.update_teacher(teacher, student, 0.99)
    assert torch.isfinite(loss)


def test_a_copy_is_mostly_the_method_file():
    """Printed for the record (the share of common.py in a copy); asserted only loosely."""
    for method in ("vader", "clove"):
        _, own, shared = copied_module(method)
        print(f"{method}: {own} lines from {method}.py, {shared} from common.py ({shared / (own + shared):.0%})")
        assert shared < own


# ---- the pieces check what they are given ----
import random  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

import clove  # noqa: E402
import common  # noqa: E402
import vader  # noqa: E402


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_vader_loss_computes_in_fp32_whatever_its_inputs():
    q, k, queue = unit(12, 8, seed=1), unit(12, 8, seed=2), unit(32, 8, seed=3)
    # fp32: the same bits as Eq. 2 written out (the loss before it cast its inputs)
    logits = torch.cat([(q / 0.07 * k).sum(1, keepdim=True), q / 0.07 @ queue.t()], 1)
    expected = F.cross_entropy(logits, torch.zeros(12, dtype=torch.long))
    assert torch.equal(vader.vader_loss(q, k, queue, 0.07), expected)
    # a bf16 step's q and k against an fp32 queue (a dtype error before), and all-bf16 inputs: computed in fp32
    low = [x.bfloat16() for x in (q, k, queue)]
    reference = vader.vader_loss(*(x.float() for x in low), 0.07)
    got_mixed = vader.vader_loss(low[0], low[1], queue.float(), 0.07)
    got_bf16 = vader.vader_loss(*low, 0.07)
    assert got_bf16.dtype == torch.float32 and torch.equal(got_bf16, reference)
    assert got_mixed.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(vader.vader_loss(q, k, queue, 0.07), expected)  # autocast does not reach inside


def test_vader_loss_refuses_a_key_with_gradient_and_mismatched_shapes():
    q, k, queue = unit(6, 8), unit(6, 8, seed=1), unit(16, 8, seed=2)
    with pytest.raises(ValueError, match="no gradient"):
        vader.vader_loss(q, k.clone().requires_grad_(), queue, 0.07)
    with pytest.raises(ValueError, match="P x d"):
        vader.vader_loss(q, k[:5], queue, 0.07)
    with pytest.raises(ValueError, match="queue"):
        vader.vader_loss(q, k, unit(16, 4), 0.07)


def test_clove_loss_checks_its_mask():
    pred, target = unit(2, 4, 8), unit(2, 9, 8, seed=1)
    good = torch.rand(2, 4, 9, generator=torch.Generator().manual_seed(0)) < 0.3
    assert torch.isfinite(clove.clove_loss(pred, target, good))
    with pytest.raises(ValueError, match="positive"):
        clove.clove_loss(pred, target, good[:, :, :1])  # N x Ls x 1 broadcast silently before
    with pytest.raises(ValueError, match="positive"):
        clove.clove_loss(pred, target, good[:1])
    with pytest.raises(TypeError, match="bool"):
        clove.clove_loss(pred, target, good.float())


def test_views_check_their_sizes_and_inputs():
    with pytest.raises(ValueError, match="multiple of the output stride"):
        vader.PairedViews(62)
    with pytest.raises(ValueError, match="multiple of the output stride"):
        vader.PairedViews(2)
    with pytest.raises(ValueError, match="num_matches"):
        vader.PairedViews(16, num_matches=17)  # a 4 x 4 grid has 16 cells
    with pytest.raises(ValueError, match="image_size 60"):
        clove.CLoVEViews(60)  # 1 x 1 masks for a 2 x 2 grid before
    with pytest.raises(ValueError, match="local_size 48"):
        clove.CLoVEViews(64, 2, 48)
    with pytest.raises(ValueError, match="local_size 16"):
        clove.CLoVEViews(64, 2, 16)  # an empty C5 grid
    assert clove.CLoVEViews(64, 0, 16).local_crops == 0  # no local crops: their size is never used
    for views in (vader.PairedViews(32, 4), clove.CLoVEViews(64, 1, 32)):
        with pytest.raises(TypeError, match="PIL image"):
            views(torch.zeros(3, 64, 64, dtype=torch.uint8))
        out = views(Image.new("L", (80, 70), 128), random.Random(0))  # a grey-level image is converted to RGB
        assert all(x.dtype == torch.uint8 and x.shape[-3] == 3 for x in out[:2])


def test_appearance_ops_take_raw_uint8_views():
    images, params = torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.stack([common.draw_appearance(random.Random(i))
                                                                              for i in range(2)])
    assert common.apply_appearance(images, params).dtype == torch.float32
    with pytest.raises(TypeError, match="uint8"):
        common.apply_appearance(images.float(), params)  # already normalised views would be normalised twice
    with pytest.raises(ValueError, match="N x 12"):
        common.apply_appearance(images, params[:1])


def test_resnet_arch_is_a_value_error_in_the_library_and_one_line_in_the_scripts(tmp_path):
    import subprocess
    with pytest.raises(ValueError, match="resnet9"):
        common.resnet("resnet9")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "vader.py"), "--arch", "resnet9"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 2 and "--arch" in out.stderr and "Traceback" not in out.stderr


def test_lars_takes_a_closure_and_gives_the_papers_groups():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    x = torch.randn(8, 4)
    groups = clove.LARS.exclude_bias_and_norm(net, weight_decay=0.5)
    assert [len(g["params"]) for g in groups] == [1, 3]  # the weight; the bias and BN's weight and bias
    assert [g["lars_exclude"] for g in groups] == [False, True] and groups[1]["weight_decay"] == 0.0
    # build_optimizer is the same two groups
    built = clove.build_optimizer(net, 0.1, weight_decay=0.5)
    assert [[id(p) for p in g["params"]] for g in built.param_groups] == [[id(p) for p in g["params"]] for g in groups]
    opt = clove.LARS(groups, lr=0.1, weight_decay=0.5)

    def closure():
        opt.zero_grad()
        loss = net(x).square().mean()
        loss.backward()
        return loss

    before = [p.detach().clone() for p in net.parameters()]
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    # an excluded bias moves by lr x its gradient (momentum buffer = gradient at step 1): no decay, no trust ratio
    net2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    net2.load_state_dict(dict(zip(net.state_dict().keys(), [b for b in before] + list(net.state_dict().values())[4:])))
    loss2 = net2(x).square().mean()
    loss2.backward()
    assert torch.allclose(net[0].bias, before[1] - 0.1 * net2[0].bias.grad, atol=1e-7)
