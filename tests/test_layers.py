import subprocess
import sys


def test_core_and_hal_import_no_torch():
    code = "import sys, furiosa_llm, furiosa_llm.core, furiosa_llm.hal; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_furiosa_llm_is_cheap():
    code = (
        "import sys, furiosa_llm; from furiosa_llm import SamplingParams, EngineArgs; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
