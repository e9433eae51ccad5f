"""``python -m data_modules.synthetic --root DIR ...``: write a synthetic cohort."""

from data_modules.synthetic.cohort import main

main()
