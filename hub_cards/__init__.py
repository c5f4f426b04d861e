"""Model-card templates and Hub export (``hf_linattn.hub_cards``): arrives with the conversion issue."""
