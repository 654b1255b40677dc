"""The compose family of build methods: ``upcycle`` (one dense model -> an MoE of copies) and
``compose`` (independently trained experts -> one MoE, FlexOlmo- or BTX-style).

plan.py checks a spec against its inputs without reading weights; arch.py says what the output
architecture is; recipe.py streams each output tensor; routers.py computes the router weights;
execute.py writes it all in the build's temporary folder.
"""
