import torch

import proxrank


def test_prox_lowers_rank():
    torch.manual_seed(0)
    lin = torch.nn.Linear(20, 30)
    opt = proxrank.ProxRank(torch.optim.SGD(lin.parameters(), lr=0.1), lin, lam=5.0)
    opt.step()
    assert torch.linalg.matrix_rank(lin.weight) < 20
