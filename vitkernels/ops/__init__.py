"""One module per op: public function, torch.library custom ops, autograd, fake
impls and the op's backend list. `_dispatch` holds what they share."""
