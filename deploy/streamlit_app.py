"""The entrypoint for hosted Streamlit (Community Cloud): it runs the app exactly as `streamlit
run app.py` does. It lives in its own folder because the host installs the dependency file that
sits beside the entrypoint: deploy/requirements.txt, the CPU build of torch (the plain pin in the
top-level requirements.txt resolves to the CUDA build, about 2.5 GB of libraries, on Linux).
deploy/static links to the app's static/ folder, which Streamlit serves beside the entrypoint.
"""
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `streamlit run deploy/streamlit_app.py` puts only deploy/ there

runpy.run_path(str(ROOT / "app.py"), run_name="__main__")
