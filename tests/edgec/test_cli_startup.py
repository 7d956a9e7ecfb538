"""The import contract at run time: ``edgec --help`` loads no ML package."""

import subprocess
import sys

HEAVY = ["numpy", "onnx", "onnxruntime", "tensorflow", "torch", "compiler", "agent", "ota_server"]


def _loaded_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_help_imports_no_ml_package():
    loaded = _loaded_after(
        "import contextlib, io\nfrom cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    for args in (['--help'], ['agent', '--help'], ['fleet', '--help']):\n"
        "        try:\n            main(args)\n        except SystemExit:\n            pass"
    )
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_profiles_list_imports_no_ml_package():
    loaded = _loaded_after(
        "import contextlib, io\nfrom cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n    main(['profiles', 'list'])"
    )
    assert "device_profiles" in loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_wire_contract_imports_no_ml_package():
    loaded = _loaded_after("import edgec.manifest, edgec.errors")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
