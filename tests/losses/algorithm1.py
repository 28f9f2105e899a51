"""The ADM paper's Algorithm 1, kept as printed except for one fix: the listing's
``.unsqueeze(1)`` on the denominators broadcasts [B, H, W] / [B, 1, 1, 1] to [B, B, H, W]; Eq. 7-8
mean the [B, 1, H, W] maps, so the maps are unsqueezed after the division. The oracle of
ADMLoss's equivalence test."""
import torch.nn as nn
import torch.nn.functional as F


class ADM(nn.Module):
    def __init__(self, tea, stu, alpha, beta, gamma):
        super().__init__()
        self.tea = tea
        self.stu = stu
        self.alpha = alpha
        self.beta = beta
        self.gamma = gamma

    def forward(self, feat_stu, feat_tea, target):
        feat_loss = self.feat_loss(feat_stu, feat_tea, tea_detach=True)
        adm_loss = self.adm_loss(feat_stu[-1], feat_tea[-1], target)
        return adm_loss + self.gamma * feat_loss

    def adm_loss(self, stufm, teafm, target):
        sim = F.cosine_similarity(stufm, teafm, dim=1).detach()
        attn_adv = ((1 - sim) / ((1 - sim).mean(dim=(2, 1), keepdim=True) + 1e-5)).unsqueeze(1)
        attn_co = ((1 + sim) / (1 + sim.mean(dim=(2, 1), keepdim=True) + 1e-5)).unsqueeze(1)
        logits_tea = self.tea.fc(self.tea.avgpool(attn_adv * F.relu(teafm)).view(attn_adv.size(0), -1))
        logits_stu = self.stu.fc(self.stu.avgpool(attn_co * F.relu(stufm)).view(attn_co.size(0), -1))
        return self.alpha * F.cross_entropy(logits_stu, target) + self.beta * F.cross_entropy(logits_tea, target)

    def feat_loss(self, feat_stu, feat_tea, tea_detach=True):
        loss = 0
        N = len(feat_stu)
        for idx in range(1, N):
            ft = feat_tea[idx]
            fs = feat_stu[idx]
            if tea_detach:
                ft = ft.detach()
            loss += F.mse_loss(fs, ft) / 2 ** (N - idx)
        return loss
