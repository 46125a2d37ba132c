import pyro.contrib.gp as gp
import torch

from pyro_ntk import NTKGPRegression

torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.Tanh(), torch.nn.Linear(40, 1))
X, opt = torch.linspace(-5, 5, 200).unsqueeze(-1), torch.optim.Adam(net.parameters(), lr=1e-2)
for _ in range(300):  # the source task: y = sin(x)
    opt.zero_grad()
    (net(X) - torch.sin(X)).square().mean().backward()
    opt.step()

Xt = torch.linspace(-4, 4, 8).unsqueeze(-1)  # the target task, 8 points: y = 1.5 sin(x + 0.5)
gpr = NTKGPRegression(Xt, 1.5 * torch.sin(Xt + 0.5).squeeze(-1), net)  # mean f(x; θ*), kernel σ²JJᵀ
gp.util.train(gpr, num_steps=100)  # SVI fits the noise and σ² by the marginal likelihood
mean, var = gpr(torch.linspace(-5, 5, 100).unsqueeze(-1))  # posterior mean and variance
